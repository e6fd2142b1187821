"""The TOFU evaluator in layers, each importing only the ones above it in this list:

  metrics      pure metric math (stdlib + numpy): truth ratio, probability, forget quality, ROUGE, TE,
               ES, MU-18/FE, the real-world scenario's MU/FE
  logs         TOFU-format logs: write, read, check retain logs, aggregate, summarize and print
  engine       scoring, generation, the CS/NLI models and evaluate() on a model in memory
  attacks      the relearning and quantization attacks on a saved model, each evaluated by evaluate()
  method_eval  MethodEval, what the method scripts call before/after/per epoch

evaluate_tofu.py is the command line on top; evaluate_general.py runs lm-eval benchmarks.
"""
