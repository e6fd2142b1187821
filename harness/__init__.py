"""What the method scripts share besides the data (common.py), one module per job:

  flags      the shared arguments, recipes, parse-time checks and the run folder's name
  scenarios  the quick subset, the user's own data and Closer-Look's real-world scenario
  models     the embedded preset, model and tokenizer loading, the prompt format, precision, LoRA
  launch     the Accelerator, frozen models, the starting model, saving, step counts, logged losses
  forward_batch  one forward over several micro-batches (--forward_batch), each loss on its own rows
  runlog     args.json, metrics.jsonl, trackers, atomic writes and summary tables

Each takes the few fields it needs; none holds method logic.
"""
import logging

# peft imports bitsandbytes (for --quantize_attack) when it is installed, and its CPU backend then warns at
# import that an optional kernel package is missing: noise at every start of every script.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
