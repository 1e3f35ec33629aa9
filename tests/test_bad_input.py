"""The bad-input table: every entry exits with code 2, prints one line naming what to change, and
leaves nothing behind. (Running out of disk while checkpointing is in test_resume.py.)"""
import gzip
import json

import pytest

from steplm.cli import main
from steplm.train.guards import RunLock

from conftest import ROOT, shared

T = "{tmp}"
RUN = "{run}"
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.vocab_size=512", "--set", "model.max_seq_len=32", "--set", "train.seq_len=16"]

TABLE = [
    # plan
    (["plan", "--hidden", "64", "--layers", "0"], "--layers"),
    (["plan", "--hidden", "64", "--layers", "-3"], "--layers"),
    (["plan", "--hidden", "64", "--layers", "4", "--stages", "5"], "--stages"),
    (["plan", "--hidden", "64", "--layers", "4", "--lora-rank", "65"], "--lora-rank"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "2,1"], "--layers-per-stage"),
    (["plan", "--hidden", "64", "--layers", "4", "--stages", "3", "--layers-per-stage", "3,0,1"], "--layers-per-stage"),
    (["plan", "--hidden", "2048", "--budget-gb", "0.01"], "--budget-gb"),
    (["plan", "--hidden", "2048", "--budget-gb", "-1"], "--budget-gb"),
    (["plan", "--layers", "4"], "--hidden"),
    (["plan", "--hidden", "64", "--layers", "4", "--n-heads", "4", "--n-kv-heads", "3"], "--n-kv-heads"),
    # plan: inputs beyond the planner's bounds are refused with the bound (not left running)
    (["plan", "--hidden", "1024", "--layers", "100000000", "--stages", "50"], "at most 1000000"),
    (["plan", "--hidden", "1024", "--layers", "100000", "--stages", "5000"], "--stages"),
    (["plan", "--hidden", "99999999", "--layers", "4"], "--hidden"),
    (["plan", "--hidden", "1024", "--budget-gb", "nan"], "--budget-gb"),
    (["plan", "--hidden", "1024", "--budget-gb", "inf"], "--budget-gb"),
    (["plan", "--hidden", "1024", "--budget-gb", "1e12", "--stages", "0"], "--stages"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "3,x"], "--layers-per-stage"),
    # an empty or malformed split is refused, not read as "not given" (then the optimum would be printed)
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", ""], "--layers-per-stage: expected the layers"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", " "], "--layers-per-stage: expected the layers"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "2,,2"], "--layers-per-stage: expected comma"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "2,2,"], "--layers-per-stage: expected comma"),
    # forms Python's int() takes but a layer count is not written as
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "2_0,2"], "--layers-per-stage: expected comma"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "+2,2"], "--layers-per-stage: expected comma"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage=2,-2"], "--layers-per-stage: expected comma"),
    (["plan", "--hidden", "64", "--layers", "4", "--layers-per-stage", "\u0663,1"], "--layers-per-stage: expected comma"),
    (["plan", "--preset", "368m", "--layers-per-stage", ""], "--layers-per-stage: expected the layers"),
    # a split without --layers: L is asked for, not checked against a placeholder depth ("must sum to --layers (2)")
    (["plan", "--hidden", "64", "--layers-per-stage", "3,3"], "--layers: give the total layer count L"),
    (["plan", "--hidden", "64", "--layers", "4", "--extended", "--seq-len", "99999999999"], "--seq-len"),
    # plan: flags the plan would not read
    (["plan", "--hidden", "256", "--budget-gb", "1", "--layers-per-stage", "3,3"], "--layers-per-stage: not used"),
    (["plan", "--hidden", "256", "--budget-gb", "1", "--layers", "6"], "--layers: not used with --budget-gb"),
    (["plan", "--hidden", "256", "--layers", "6", "--stages", "3", "--layers-per-stage", "3,3"],
     "--layers-per-stage: needs --stages (3) entries, got 2"),
    (["plan", "--hidden", "256", "--layers", "6", "--layers-per-stage", "1,5", "--cap-growth"], "--cap-growth"),
    (["plan", "--hidden", "256", "--layers", "9", "--layers-per-stage", "2,2,5", "--cap-growth"], "stage 3 adds 5"),
    (["plan", "--hidden", "256", "--layers", "6", "--vocab-size", "8192"], "--vocab-size: describes"),
    (["plan", "--hidden", "256", "--layers", "6", "--seq-len", "256"], "give --extended too"),
    (["plan", "--hidden", "256", "--layers", "6", "--micro-batch", "4"], "--micro-batch"),
    (["plan", "--hidden", "256", "--layers", "6", "--checkpointing"], "--checkpointing"),
    (["plan", "{tiny_yaml}", "--extended"], "--extended: not used with a CONFIG"),
    # plan: the head shapes train refuses, in train's words (the config's own check)
    (["plan", "--hidden", "64", "--layers", "4", "--n-heads", "3"], "--hidden: must be divisible by --n-heads (3)"),
    (["plan", "--hidden", "64", "--layers", "4", "--n-heads", "128"], "--hidden: must be divisible by --n-heads"),
    (["plan", "--hidden", "64", "--layers", "4", "--n-heads", "64"], "even integer for RoPE, got 1"),
    (["plan", "--hidden", "60", "--layers", "4", "--n-heads", "4", "--extended"], "even integer for RoPE, got 15"),
    # train: data
    (["train", "--out", f"{T}/o", "--data", f"{T}/missing.txt"], "--data"),  # the flag typed, not the key it sets
    (["train", "--out", f"{T}/o", "--data", f"{T}/empty.txt", "--set", "data.tokenizer=bpe:300"], "empty corpus"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/latin1.txt", "--set", "data.tokenizer=bpe:300"], "not UTF-8"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/notext.jsonl.gz", "--set", "data.tokenizer=bpe:300"], "'text'"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.tokenizer={gpt2}", *TINY],
     "model.vocab_size"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.tokenizer=/nonexistent/tok"],
     "data.tokenizer"),
    # train: the validation data is named as such
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.val_path=" + T + "/short.txt", "--set",
      "data.tokenizer=bpe:300", *TINY], "data.val_path: " + T + "/short.txt holds"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.val_path=" + T + "/latin1.txt", "--set",
      "data.tokenizer=bpe:300"], "data.val_path: " + T + "/latin1.txt is not UTF-8"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.val_path=" + T + "/notext.jsonl.gz",
      "--set", "data.tokenizer=bpe:300"], "data.val_path: line 1"),
    (["train", "--out", f"{T}/o", "--set", "train.eval_tokens=8", "--set", "train.seq_len=16"],
     "train.eval_tokens: must be at least one window"),
    # train: model.init_from names what is wrong with the folder
    (["train", "--out", f"{T}/o", "--init-from", f"{T}/none"], "--init-from: " + T + "/none does not exist"),
    (["train", "--out", f"{T}/o", "--init-from", f"{T}/afile"], "is not a directory"),
    (["train", "--out", f"{T}/o", "--init-from", f"{T}/full"], "has no config.json"),
    # train: a value given twice, or by a flag and --set, is refused, not settled silently
    (["train", "--out", f"{T}/o", "--set", "train.lr=1e-3", "--set", "train.lr=2e-3"],
     "--set train.lr: given twice ('1e-3', then '2e-3')"),
    (["train", "--out", f"{T}/o", "--set", "train.seed=5", "--seed", "7"], "--seed: also given as --set train.seed"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=3e-4", "--lr", "3e-3"], "--lr: also given as --set train.lr"),
    (["train", "--out", f"{T}/o", "--set", "train.max_steps=3", "--max-steps", "2"], "--max-steps: also given"),
    (["train", "--out", f"{T}/o", "--set", f"data.path={T}/ok.txt", "--data", f"{T}/short.txt"], "--data: also given"),
    (["plan", "{tiny_yaml}", "--set", "model.n_layers=4", "--set", "model.n_layers=6"], "given twice"),
    # train: a bpe:N tokenizer larger than the embedding, found before the corpus is tokenized
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.tokenizer=bpe:4096", "--set",
      "model.vocab_size=300"], "model.vocab_size: 300 is below the 4096 tokens"),
    (["plan", "{tiny_yaml}", "--set", "model.vocab_size=1000"], "model.vocab_size: 1000 is below"),
    # an empty config value is refused, not read as "not given" (a string key kept "", which reads as unset)
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "data.val_path="],
     "data.val_path: expected a non-empty string, got an empty value"),
    (["train", "--out", f"{T}/o", "--model.init_from", ""], "--model.init_from: expected a non-empty string"),
    (["plan", "{tiny_yaml}", "--data.cache_dir", " "], "--data.cache_dir: expected a non-empty string"),
    (["plan", "{tiny_yaml}", "--set", "data.max_train_tokens="], "data.max_train_tokens: expected an integer or null, "
     "got an empty value"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", f"{T}/empty_val.yaml"],
     "data.val_path: expected a non-empty string, got an empty value (write null or leave the key out)"),
    (["plan", f"{T}/empty_init.yaml"], "model.init_from: expected a non-empty string, got an empty value (write null"),
    (["plan", f"{T}/empty_tok.yaml"], "data.tokenizer: expected a non-empty string, got an empty value (leave the key "
     "out for its default)"),
    (["plan", f"{T}/empty_exclude.yaml"], "data.exclude[1]: expected a non-empty string, got an empty value (remove"),
    (["plan", f"{T}/empty_sft.yaml"], "sft.data: expected a non-empty string, got an empty value"),
    (["plan", f"{T}/emptydir"], "is a directory; give a YAML file"),
    (["plan", "--init-from", f"{T}/hfexport", "--set", f"model.init_from={T}/full"],
     "--init-from: also given as --set model.init_from"),
    # train: config
    (["train", "--out", f"{T}/o", "--set", "train.bogus=1"], "unknown config key: train.bogus"),
    (["train", "--out", f"{T}/o", f"{T}/bad.yaml"], "not valid YAML"),
    (["train", "--out", f"{T}/o", f"{T}/nope.yaml"], "config file not found"),
    (["train", "--out", f"{T}/o", "--set", "model.d_model=30", "--set", "model.n_heads=4"], "model.d_model"),
    (["train", "--out", f"{T}/o", "--set", "model.n_layers=0"], "model.n_layers"),
    (["train", "--out", f"{T}/o", "--set", "lora.rank=999"], "lora.rank"),
    (["train", "--out", f"{T}/o", "--set", "method=galore", "--set", "galore.rank=999"], "galore.rank: must be at most"),
    (["train", "--out", f"{T}/o", "--set", "method=apollo", "--set", "apollo.rank=100000"], "apollo.rank: must be at most"),
    (["train", "--out", f"{T}/o", "--set", "method=step", "--set", "step.n_stages=2",
      "--set", "step.layers_per_stage=[3,4]"], "step.layers_per_stage"),
    (["train", "--out", f"{T}/o", "--set", "step.growth_fraction=1.5"], "step.growth_fraction"),
    (["train", "--out", f"{T}/o", "--set", "step.growth_fraction=0"], "step.growth_fraction"),
    (["train", "--out", f"{T}/o", "--set", "method=sgd"], "method"),
    (["train", "--out", f"{T}/o", "--set", "step.position=middle"], "step.position"),
    (["train", "--out", f"{T}/o", "--set", "step.n_stages=20", "--set", "model.n_layers=8"], "step.n_stages"),
    (["train", "--out", f"{T}/o", "--set", "train.seq_len=9999"], "train.seq_len"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=fast"], "train.lr"),
    # train: every value is checked against its field's type before anything is built
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.d_model=abc"], "model.d_model"),
    (["train", "--out", f"{T}/o", "--set", "train.max_steps=true"], "train.max_steps: must be an integer"),
    (["train", "--out", f"{T}/o", "--set", "train.micro_batch=2.5"], "train.micro_batch"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=[1]"], "train.lr: must be a number"),
    (["train", "--out", f"{T}/o", "--set", "train.lr={a: [1, {b: 2}]}"], "train.lr"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=[1"], "train.lr: cannot read"),
    (["train", "--out", f"{T}/o", "--set", "train.compile=maybe"], "train.compile: must be true or false"),
    (["train", "--out", f"{T}/o", "--set", "train.compile=1"], "train.compile"),
    (["train", "--out", f"{T}/o", "--set", "data.max_train_tokens=lots"], "data.max_train_tokens"),
    (["train", "--out", f"{T}/o", "--set", "data.exclude=[1,2]"], "data.exclude[0]"),
    (["train", "--out", f"{T}/o", "--set", "step.layers_per_stage=[1,[2,3]]"], "step.layers_per_stage[1]"),
    (["train", "--out", f"{T}/o", "--set", "model.n_kv_heads=[2]"], "model.n_kv_heads"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", f"{T}/list.yaml"], "top level must be a mapping"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", f"{T}/scalar.yaml"], "top level must be a mapping"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", f"{T}/list_section.yaml"], "train: must be a mapping"),
    (["train", "--out", f"{T}/o", f"{T}/list_section.yaml", "--set", "train.lr=1"], "train: must be a mapping"),
    (["train", "--out", f"{T}/o", f"{T}/mapping_str.yaml"], "data.tokenizer: must be a string"),
    (["train", "--out", f"{T}/o", f"{T}/yes_lr.yaml"], "train.lr: must be a number"),
    (["train", "--out", f"{T}/o", f"{T}/nested.yaml"], "model.d_model: must be an integer"),
    (["train", "--out", f"{T}/o", f"{T}/str_int.yaml"], "train.max_steps: must be an integer"),
    # train: non-finite and out-of-range hyperparameters
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "train.lr=inf"], "train.lr: must be a finite"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=nan"], "train.lr: must be a finite"),
    (["train", "--out", f"{T}/o", "--set", "train.lr=-inf"], "train.lr: must be a finite"),
    (["train", "--out", f"{T}/o", "--set", "train.beta1=nan"], "train.beta1"),
    (["train", "--out", f"{T}/o", "--set", "train.embedding_lr_scale=0"], "train.embedding_lr_scale: must be positive"),
    (["train", "--out", f"{T}/o", "--set", "train.embedding_lr_scale=-2"], "train.embedding_lr_scale: must be positive"),
    (["train", "--out", f"{T}/o", "--set", "train.embedding_lr_scale=nan"], "train.embedding_lr_scale"),
    (["train", "--out", f"{T}/o", "--set", "train.embedding_lr_scale=ten"], "train.embedding_lr_scale"),
    (["train", "--out", f"{T}/o", "--set", "train.weight_decay=.inf"], "train.weight_decay"),
    (["train", "--out", f"{T}/o", "--set", "train.max_grad_norm=1e999"], "train.max_grad_norm"),
    (["train", "--out", f"{T}/o", "--set", "lora.alpha=NaN"], "lora.alpha"),
    (["train", "--out", f"{T}/o", "--set", "model.norm_eps=-.inf"], "model.norm_eps"),
    (["train", "--out", f"{T}/o", "--set", "model.norm_eps=1e30"], "model.norm_eps: must be in (0, 1)"),
    (["train", "--out", f"{T}/o", "--set", "model.norm_eps=1"], "model.norm_eps: must be in (0, 1)"),
    (["train", "--out", f"{T}/o", "--set", "model.norm_eps=0"], "model.norm_eps: must be in (0, 1)"),
    (["train", "--out", f"{T}/o", "--set", "step.growth_fraction=nan"], "step.growth_fraction"),
    (["train", "--out", f"{T}/o", f"{T}/inf.yaml"], "train.grad_clip: must be a finite"),
    (["train", "--out", f"{T}/o", "--set", "train.beta2=1.5"], "train.beta2"),
    (["train", "--out", f"{T}/o", "--set", "train.weight_decay=-0.1"], "train.weight_decay"),
    (["train", "--out", f"{T}/o", "--set", "train.log_every=0"], "train.log_every"),
    (["train", "--out", f"{T}/o", "--set", "train.seed=-1"], "train.seed"),
    (["train", "--out", f"{T}/o", "--set", "lora.merge_rounding=up"], "lora.merge_rounding"),
    # train: shapes no machine holds, refused with the bound before anything is allocated
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.d_model=1000000000"], "model.d_model"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.d_model=65536"], "needs at least"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.vocab_size=100000000000"],
     "model.vocab_size"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.n_layers=100000000"], "model.n_layers"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "model.max_seq_len=2000000000"],
     "lower model.max_seq_len"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "train.micro_batch=1000000000"],
     "lower train.micro_batch"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "train.micro_batch=300000", "--set",
      "train.seq_len=1024", "--set", "model.max_seq_len=1024"], "lower train.micro_batch"),
    (["train", "--out", f"{T}/o", "--data", f"{T}/ok.txt", "--set", "method=step", "--set", "step.n_stages=2",
      "--set", "model.n_layers=2", "--set", "model.d_model=131072", "--set", "model.n_heads=128"], "model.d_model"),
    # train: flags
    (["train", "--out", f"{T}/o", "--max-steps", "abc"], "--max-steps"),
    (["train", "--out", f"{T}/o", "--max-steps", "0"], "--max-steps"),
    (["train", "--out", f"{T}/o", "--max-steps", "1.5"], "--max-steps"),
    (["train", "--out", f"{T}/o", "--seed", "x"], "--seed"),
    (["train", "--out", f"{T}/o", "--seed", "-1"], "--seed"),
    (["train", "--out", f"{T}/o", "--seed", "99999999999"], "--seed"),
    # train: one writer per run directory
    (["train", "--out", f"{T}/locked", "--data", f"{T}/ok.txt"], "in use by another steplm train"),
    (["train", "--out", f"{T}/afile/sub", "--data", f"{T}/ok.txt"], "--out"),
    (["train", "--out", f"{T}/full", "--fresh", "--data", f"{T}/ok.txt"], "--fresh"),
    # train: an --out that a run would clobber (a finished run, files that are not a run)
    (["train", "--out", RUN, "--data", f"{T}/ok.txt"], "holds a finished run"),
    (["train", "--out", f"{T}/full", "--data", f"{T}/ok.txt"], "holds no run to resume"),
    (["train", "--out", f"{T}/hfexport", "--data", f"{T}/ok.txt"], "holds no run to resume"),
    (["train", "--out", f"{T}/afile", "--data", f"{T}/ok.txt"], "--out: "),
    (["train", "--out", f"{T}/sftdone", "--data", f"{T}/ok.txt"], "holds a finished run"),
    # eval
    (["eval", f"{T}/ok.txt", "--data", f"{T}/ok.txt"], "MODEL"),
    (["eval", f"{T}/gpt2dir", "--data", f"{T}/ok.txt"], "Llama"),
    (["eval", RUN, "--data", f"{T}/missing.txt"], "--data"),
    (["eval", RUN, "--tasks", "piqa,mmlu"], "--tasks"),
    # eval: what is wrong with --data is named by eval's flags, not by train's config keys
    (["eval", RUN, "--data", f"{T}/notext.jsonl.gz"], "has no string field 'text' (set --text-field)"),
    (["eval", RUN, "--data", f"{T}/notext.jsonl.gz", "--text-field", ""], "--text-field: expected a name"),
    (["eval", RUN, "--data", f"{T}/notext.jsonl.gz", "--text-field", "content"], "--data: line 1"),
    (["eval", RUN, "--data", f"{T}/latin1.txt"], "--data: "),
    (["eval", RUN, "--data", f"{T}/emptydir"], "--data: no .txt/.jsonl"),
    (["eval", RUN, "--data", f"{T}/ok.txt", "--max-tokens", "1"], "--max-tokens: 1 is less than one window"),
    (["eval", RUN, "--data", f"{T}/ok.txt", "--max-tokens", "7", "--seq-len", "8"], "--max-tokens"),
    (["eval", f"{T}/none", "--data", f"{T}/ok.txt"], "MODEL: " + T + "/none does not exist"),
    # eval: where the task sets are is given, never guessed
    (["eval", RUN, "--tasks", "piqa"], "--tasks-dir: give the folder of task sets"),
    (["eval", RUN, "--tasks", "piqa", "--tasks-dir", f"{T}/none"], "--tasks-dir: " + T + "/none is not a directory"),
    (["eval", RUN, "--tasks", "all", "--tasks-dir", f"{T}/emptydir"], "holds none of the task folders"),
    (["eval", RUN], "--data: give a text file to score (perplexity), --tasks (zero-shot scores), or both"),
    (["eval", RUN, "--tasks", ","], "--tasks: give at least one task name"),
    (["eval", RUN, "--tasks", ""], "--tasks: give at least one task name"),
    (["eval", RUN, "--tasks", " , ,"], "--tasks: give at least one task name"),
    (["eval", RUN, "--tasks", "pi\udcffqa"], "--tasks: is not valid UTF-8"),
    # plot
    (["plot", f"{T}/none"], "RUN_DIR: " + T + "/none is not a directory"),
    (["plot", RUN, "--vanilla", f"{T}/none"], "--vanilla: " + T + "/none is not a directory"),
    (["plot", RUN, "--vanilla", f"{T}/full"], "--vanilla: " + T + "/full has no summary.json"),
    (["plot", RUN, "--vanilla", f"{T}/sftdone"], "--vanilla: "),
    (["plot", RUN, "--vanilla", f"{T}/stepsum"], "--vanilla: " + T + "/stepsum is a 'step' run; give a vanilla run"),
    (["plot", f"{T}/nocfg"], "RUN_DIR: " + T + "/nocfg has no config.yaml"),
    (["plot", f"{T}/oldcfg"], "config.yaml is not one this steplm reads (unknown config key: sft.oldkey)"),
    # export
    (["export", f"{T}/full", "--to", f"{T}/x"], "RUN_DIR"),
    (["export", f"{T}/none", "--to", f"{T}/x"], "RUN_DIR"),
    (["export", f"{T}/ok.txt", "--to", f"{T}/x"], "RUN_DIR: " + T + "/ok.txt is a file, not a run directory"),
    (["export", RUN, "--to", f"{T}/x", "--dtype", "fp16"], "--dtype"),
    (["export", RUN, "--to", f"{T}/x", "--max-shard-size", "lots"], "--max-shard-size"),
    # sft
    (["sft", RUN, "--data", f"{T}/missing.json", "--out", f"{T}/o"], "--data"),
    (["sft", RUN, "--data", f"{T}/noinstr.json", "--out", f"{T}/o"], "instruction"),
    # sft: fields that are not text are refused, not turned into text
    (["sft", RUN, "--data", f"{T}/input_int.json", "--out", f"{T}/o"], "record 2 of"),
    (["sft", RUN, "--data", f"{T}/output_list.json", "--out", f"{T}/o"], "an 'output' that is not a string (list)"),
    (["sft", RUN, "--data", f"{T}/instance_null.jsonl", "--out", f"{T}/o"], "record 1 instance 2 of"),
    (["sft", RUN, "--data", f"{T}/all_blank.json", "--out", f"{T}/o"], "--data: no example of"),
    (["sft", RUN, "--data", f"{T}/both.jsonl", "--out", f"{T}/o"], "has both 'output' and 'instances'"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/full"], "holds no run to resume"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", RUN], "holds a finished run"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/sftdone"], "holds a finished run"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/hfexport"], "holds no run to resume"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--lr", "nan"], "--lr"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--lr", "-1"], "--lr"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--seed", "-1"], "--seed"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--seed", "1" + "0" * 20], "--seed"),
    # sft: --set keys that sft would ignore (the shape is MODEL's) or that a flag owns
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "model.d_model=64"],
     "--set model.d_model: sft takes only train.* keys"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "lora.rank=4"], "--set lora.rank"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "method=step"], "--set method"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "data.tokenizer=bpe:300"],
     "--set data.tokenizer"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "train.lr=1e-3"],
     "--set train.lr: sft sets it from --lr"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "train.max_steps=5"], "--epochs"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/o", "--set", "train.seq_len=8"],
     "--set train.seq_len: sft does not use it"),
    (["sft", RUN, "--data", f"{T}/input_zero.json", "--out", f"{T}/o"], "an 'input' that is not a string (int)"),
    # generate
    (["generate", RUN, "--prompt", ""], "--prompt"),
    (["generate", RUN, "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", RUN, "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", RUN, "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", RUN, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", RUN, "--prompt", "hi", "--seed", "1" + "0" * 20], "--seed: must be in [0, 2**32)"),
    (["generate", RUN, "--prompt", "hi", "--seed", "-1"], "--seed: must be in [0, 2**32)"),
    (["generate", RUN, "--prompt", "hi", "--seed", "4294967296"], "--seed"),
    (["generate", RUN, "--prompt", "hi", "--top-k", "-1"], "--top-k: must be non-negative"),
    (["generate", RUN, "--prompt", "hi", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    # bytes that are not UTF-8 reach Python as lone surrogates: no tokenizer or UTF-8 file takes them
    (["generate", RUN, "--prompt", "a\udcff\udcfe"], "--prompt: is not valid UTF-8 text"),
    (["generate", RUN, "--prompt", "\ud800"], "--prompt: is not valid UTF-8 text"),
    (["train", "--out", f"{T}/o", "--set", "data.tokenizer=bpe\udce9"], "--set: is not valid UTF-8"),
    # mt-bench
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/a.jsonl", "--seed", "-1"], "--seed"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/a.jsonl", "--seed", "9" * 30], "--seed"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/a.jsonl", "--model-id", "m\udcff"],
     "--model-id: is not valid UTF-8"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/a.jsonl", "--model-id", ""], "--model-id: give"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/a.jsonl", "--model-id", "  "], "--model-id"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/afile/a.jsonl"],
     "--out: " + T + "/afile is a file"),
    # mt-bench: an --out that would overwrite an input
    (["mt-bench", RUN, "--questions", f"{T}/q.jsonl", "--out", f"{T}/q.jsonl"], "is the --questions file"),
    (["mt-bench", RUN, "--questions", f"{T}/q.jsonl", "--out", f"{T}/./q.jsonl"], "is the --questions file"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", RUN + "/model.safetensors"], "is inside MODEL"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", RUN + "/answers.jsonl"], "is inside MODEL"),
    (["mt-bench", RUN, "--questions", "{questions}", "--out", f"{T}/ok.txt"], "is not a .jsonl answers file"),
    # output folders whose names are not UTF-8: tokenizer.json cannot be written there
    (["train", "--out", f"{T}/\udcffrun", "--data", f"{T}/ok.txt"], "is not a UTF-8 path"),
    (["export", RUN, "--to", f"{T}/\udcfedir"], "is not a UTF-8 path"),
    (["sft", RUN, "--data", f"{T}/alpaca.json", "--out", f"{T}/s\udcfd"], "is not a UTF-8 path"),
    (["plot", RUN, "--out", "/proc/steplm-plot.png"], "--out: cannot write /proc/steplm-plot.png"),
]


def inputs(tmp):
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "ok.txt").write_text("some words for a tokenizer to learn from. " * 200)
    (tmp / "latin1.txt").write_bytes("café olé".encode("latin-1"))
    (tmp / "short.txt").write_text("a few words.")
    (tmp / "q.jsonl").write_text(shared("eval/mt_bench/question.jsonl").read_text())
    (tmp / "emptydir").mkdir()
    with gzip.open(tmp / "notext.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "x"}) + "\n")
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    (tmp / "afile").write_text("a file, not a directory")
    (tmp / "full").mkdir()
    (tmp / "full" / "something").write_text("x")
    (tmp / "gpt2dir").mkdir()
    (tmp / "gpt2dir" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp / "noinstr.json").write_text(json.dumps([{"prompt": "x", "output": "y"}]))
    (tmp / "alpaca.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    ok = {"instruction": "x", "input": "", "output": "y"}
    (tmp / "input_int.json").write_text(json.dumps([ok, {**ok, "input": 5}]))
    (tmp / "input_zero.json").write_text(json.dumps([{**ok, "input": 0}]))
    (tmp / "output_list.json").write_text(json.dumps([{**ok, "output": ["a", "b"]}]))
    (tmp / "instance_null.jsonl").write_text(json.dumps({"instruction": "x", "instances": [
        {"input": "", "output": "y"}, {"input": "", "output": 5}]}) + "\n")
    (tmp / "both.jsonl").write_text(json.dumps({**ok, "instances": [{"input": "", "output": "z"}]}) + "\n")
    (tmp / "all_blank.json").write_text(json.dumps([{**ok, "output": ""}, {**ok, "output": " "}]))
    (tmp / "list.yaml").write_text("- a\n")
    (tmp / "scalar.yaml").write_text("5\n")
    (tmp / "list_section.yaml").write_text("train: [1, 2]\n")
    (tmp / "empty_val.yaml").write_text('data:\n  val_path: ""\n')  # YAML's empty strings, as --set KEY= is
    (tmp / "empty_init.yaml").write_text("model:\n  init_from: ' '\n")
    (tmp / "empty_tok.yaml").write_text('data:\n  tokenizer: ""\n')
    (tmp / "empty_exclude.yaml").write_text('data:\n  exclude: [tests, ""]\n')
    (tmp / "empty_sft.yaml").write_text('sft:\n  data: ""\n')
    (tmp / "mapping_str.yaml").write_text("data:\n  tokenizer: {a: 1}\n")
    (tmp / "yes_lr.yaml").write_text("train:\n  lr: yes\n")
    (tmp / "nested.yaml").write_text("model:\n  d_model: {a: [1, {b: 2}]}\n")
    (tmp / "str_int.yaml").write_text("train:\n  max_steps: '12'\n")
    (tmp / "inf.yaml").write_text("train:\n  grad_clip: .inf\n")
    (tmp / "locked").mkdir()
    (tmp / "hfexport").mkdir()  # what `steplm export` writes: no config.yaml
    (tmp / "hfexport" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp / "hfexport" / "model.safetensors").write_bytes(b"x")
    stages = {"stages": [{"stage": 0, "layers": 2, "planned_state_bytes": {"total": 1},
                          "measured_state_bytes": {"total": 1}}]}
    for name, method, config_yaml in (("stepsum", "step", "method: step\n"), ("nocfg", "vanilla", None),
                                      ("oldcfg", "vanilla", "sft:\n  oldkey: 1\n")):
        (tmp / name).mkdir()
        (tmp / name / "summary.json").write_text(json.dumps({"method": method, **stages}))
        if config_yaml:
            (tmp / name / "config.yaml").write_text(config_yaml)
    (tmp / "sftdone").mkdir()  # a finished run of another kind: config.yaml and its summary
    (tmp / "sftdone" / "config.yaml").write_text("method: vanilla\n")
    (tmp / "sftdone" / "summary.json").write_text("{}")
    (tmp / "sftdone" / "sft_summary.json").write_text("{}")


def snapshot(tmp):
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def test_table_has_at_least_30_entries_over_six_commands():
    assert len(TABLE) >= 30
    assert {args[0] for args, _ in TABLE} == {"plan", "train", "eval", "export", "sft", "generate", "mt-bench",
                                               "plot"}


@pytest.mark.parametrize("args,needle", TABLE, ids=[f"{a[0]}-{n}" for a, n in TABLE])
def test_bad_input(tiny_run, tmp_path, capsys, monkeypatch, args, needle):
    work = tmp_path / "work"
    work.mkdir()
    inputs(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("STEPLM_TASKS_DIR", raising=False)
    argv = [a.replace(T, str(work)).replace(RUN, str(tiny_run)).replace("{gpt2}", str(shared("tokenizers/gpt2")))
            .replace("{questions}", str(shared("eval/mt_bench/question.jsonl")))
            .replace("{tiny_yaml}", str(ROOT / "configs" / "tiny.yaml")) for a in args]
    if argv[0] == "train":
        argv += ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--quiet"]
    holder = RunLock(work / "locked")  # a live run holding {tmp}/locked
    before = snapshot(work)
    try:
        assert main(argv) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    # the needle must be in the message itself: pytest names tmp_path after the test id, which holds it
    assert needle.replace(T, "<work>") in err.replace(str(work), "<work>").replace(str(tmp_path), "<tmp>"), err
    assert snapshot(work) == before  # nothing half-written


def test_all_type_problems_in_one_line(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "o"), "--set", "model.d_model=abc", "--set", "train.lr=inf",
            "--set", "train.compile=1", "--set", "train.beta2=2", "--set", "lora.bogus=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for key in ("unknown config key: lora.bogus", "model.d_model", "train.lr", "train.compile", "train.beta2"):
        assert key in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "{work}/empty.txt", "--set", "data.tokenizer=bpe:300"], "empty corpus"),
    (["train", "--data", "{work}/latin1.txt", "--set", "data.tokenizer=bpe:300"], "not UTF-8"),
    (["train", "--data", "{work}/ok.txt", "--set", "data.tokenizer={gpt2}", *TINY], "model.vocab_size"),
    (["train", "--data", "{work}/ok.txt", "--set", "data.val_path={work}/empty.txt", "--set",
      "data.tokenizer=bpe:300"], "data.val_path"),
])
@pytest.mark.parametrize("depth", [1, 3])
def test_a_failed_run_removes_the_parent_folders_it_created(tmp_path, capsys, args, needle, depth):
    """--out a/b/c/run: a run that fails before its first checkpoint removes a as well (the default
    token cache lies outside, in $STEPLM_CACHE_DIR); folders that were there before stay."""
    work = tmp_path / "work"
    work.mkdir()
    inputs(work)
    out = work.joinpath(*[f"p{i}" for i in range(depth)], "run")
    before = snapshot(work)
    argv = [a.replace("{work}", str(work)).replace("{gpt2}", str(shared("tokenizers/gpt2"))) for a in args]
    assert main(argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize("where", ["beside", "above"])
def test_a_failed_run_keeps_what_others_put_in_the_folders_it_created(tmp_path, capsys, monkeypatch, where):
    """A sweep into a new folder, sweep/lr30 and sweep/lr1e-3: when lr30 fails after lr1e-3 (or the
    user) put files in sweep/, only sweep/lr30 goes; sweep/ and all it holds stay."""
    from steplm.errors import UserError
    from steplm.train.loop import Trainer

    out = tmp_path / "sweep" / "day1" / "lr30"
    other = (out.parent if where == "beside" else tmp_path / "sweep") / "lr1e-3"

    def fit(self):  # another run finishes while this one trains, then this one fails
        other.mkdir(parents=True)
        (other / "model.safetensors").write_text("a finished run's weights")
        raise UserError("train.lr: this run failed")

    monkeypatch.setattr(Trainer, "fit", fit)
    (tmp_path / "ok.txt").write_text("some words for a tokenizer to learn from. " * 200)
    argv = ["train", "--out", str(out), "--data", str(tmp_path / "ok.txt"), "--set", "data.tokenizer=bpe:300",
            "--quiet", *TINY]
    assert main(argv) == 2
    assert "this run failed" in capsys.readouterr().err
    assert not out.exists() and (other / "model.safetensors").read_text() == "a finished run's weights"
    assert (out.parent.exists()) == (where == "beside")  # sweep/day1 stays only while it holds lr1e-3


def test_an_out_with_dot_dot_creates_no_folder_on_the_way(tmp_path, capsys, monkeypatch):
    """--out nd/../run means run: a failing run leaves neither nd nor run behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text(" \n")
    assert main(["train", "--out", "nd/../run", "--data", "empty.txt", "--set", "data.tokenizer=bpe:300",
                 "--quiet"]) == 2
    assert "empty corpus" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


# Harmless or redundant input: one warning line each, and the command does what it does without it
# (args, the warnings, the same command without what changes nothing).
GREEDY = "has no effect under greedy decoding (--temperature 0); set --temperature > 0 to sample"
GEN = ["generate", RUN, "--prompt", "To be"]
EVAL = ["eval", RUN, "--data", "{wiki}", "--max-tokens", "512"]
WARNED = [
    ([*GEN, "--top-k", "50"], ["--top-k " + GREEDY], GEN),
    ([*GEN, "--top-p", "0.9"], ["--top-p " + GREEDY], GEN),
    ([*GEN, "--seed", "7"], ["--seed " + GREEDY], GEN),
    ([*GEN, "--top-k", "5", "--seed", "7"], ["--top-k " + GREEDY, "--seed " + GREEDY], GEN),
    ([*GEN, "--top-k", "0"], [], GEN),  # 0 is off, as in transformers
    ([*GEN, "--top-p", "1"], [], GEN),  # 1 is off
    ([*GEN, "--temperature", "0.8", "--seed", "3", "--top-k", "0", "--top-p", "1"], [],
     [*GEN, "--temperature", "0.8", "--seed", "3"]),
    (["plan", "{tiny_yaml}", "--seed", "7", "--set", "train.seed=7"],
     ["--seed: also given as --set train.seed, with the same value; give it once"],
     ["plan", "{tiny_yaml}", "--seed", "7"]),
    (["plan", "{tiny_yaml}", "--set", "train.lr=0.0003", "--lr", "3e-4"],
     ["--lr: also given as --set train.lr, with the same value; give it once"],
     ["plan", "{tiny_yaml}", "--lr", "3e-4"]),
    ([*EVAL, "--limit", "3"], ["--limit has no effect without --tasks (add --tasks all to run every task)"], EVAL),
    ([*EVAL, "--tasks-dir", "{eval}"],
     ["--tasks-dir has no effect without --tasks (add --tasks all to run every task)"], EVAL),
]


@pytest.mark.parametrize("args,warnings,plain", WARNED, ids=[" ".join(a[2:]) for a, _, _ in WARNED])
def test_harmless_input_is_warned_about_not_refused(tiny_run, capsys, args, warnings, plain):
    """Exit 0, exactly the expected warning lines, and the output of the command without what changes
    nothing."""
    sub = {RUN: str(tiny_run), "{tiny_yaml}": str(ROOT / "configs" / "tiny.yaml"),
           "{wiki}": str(shared("wikitext2/valid.txt")), "{eval}": str(shared("eval"))}
    assert main([sub.get(a, a) for a in args]) == 0
    out, err = capsys.readouterr()
    said = [ln.removeprefix("steplm: warning: ") for ln in err.splitlines() if ln.startswith("steplm: warning: ")]
    assert said == warnings, err
    assert main([sub.get(a, a) for a in plain]) == 0
    assert capsys.readouterr().out == out


def test_render_names_each_key_typed_as_a_flag_in_the_message_too():
    """A message that cites another key shows it under the flag that set it, and leaves alone a key
    inside a flag (--train.lr), after --set, or as the prefix of a longer key."""
    from steplm.errors import UserError

    e = UserError("must be at most model.max_seq_len (256); e.g. --set train.seq_len=128 or --train.seq_len 128; "
                  "not train.seq_len_x", key="train.seq_len")
    names = {"train.seq_len": "--seq-len", "model.max_seq_len": "--model.max_seq_len"}
    assert e.render(names) == ("--seq-len: must be at most --model.max_seq_len (256); e.g. --set train.seq_len=128 "
                               "or --train.seq_len 128; not train.seq_len_x")
    assert e.render() == str(e) == f"train.seq_len: {e.problems[0][1]}"


@pytest.mark.parametrize("flags, line", [
    (["--model.max_seq_len", "128", "--seq-len", "512"],
     "--seq-len: must be at most --model.max_seq_len (128), got 512"),
    (["--set", "model.max_seq_len=128", "--seq-len", "512"],  # typed as a config key: shown as one
     "--seq-len: must be at most model.max_seq_len (128), got 512"),
    (["--model.d_model", "64", "--set", "lora.rank=128"], "lora.rank: must be at most --model.d_model (64), got 128"),
])
def test_a_cited_key_reads_as_the_flag_typed(capsys, flags, line):
    """plan CONFIG, train's dry run: the config's check, each key under the name the user gave it."""
    assert main(["plan", str(ROOT / "configs" / "tiny-step.yaml"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"steplm: error: {line}"]
