"""Train-step throughput: steplm (as users run it: bf16 autocast + torch.compile) against Hugging Face
LlamaForCausalLM + torch.optim.AdamW in eager fp32, same shapes, same process, interleaved rounds.

Config (issue #2): d 256, 8 layers, 4 heads, vocab 50257 (GPT-2), micro-batch 8 x 256 tokens.
Prints tokens/s of each, their ratio, and the share of steplm's step time spent waiting for data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from steplm import config  # noqa: E402
from steplm.train import Trainer  # noqa: E402


def gpt2_dir() -> str:
    for cand in (os.environ.get("STEPLM_GPT2_DIR"), ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"):
        if cand and (Path(cand) / "vocab.json").is_file():
            return str(cand)
    return "bpe:50257"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    B, T = 8, 256
    cfg = config.load(None, [
        f"data.path={sysconfig.get_paths()['stdlib']}", f"data.tokenizer={gpt2_dir()}",
        "data.max_train_tokens=2000000", f"data.cache_dir={ROOT / '.cache' / 'steplm'}",
        "model.vocab_size=50257", "model.d_model=256", "model.n_layers=8", "model.n_heads=4",
        f"model.max_seq_len={T}", f"train.seq_len={T}", f"train.micro_batch={B}", "train.max_steps=1000",
        "train.dtype=bf16", "train.compile=true", "train.warmup_steps=10"])
    ours = Trainer(cfg, tmp / "run", progress=False)

    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg.model
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
                                      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                                      num_key_value_heads=m.n_kv_heads, max_position_embeddings=T,
                                      attn_implementation="eager", tie_word_embeddings=False))
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def hf_step():
        x = torch.randint(0, m.vocab_size, (B, T))
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        ours.train_step()
        ours.optimizer.zero_grad(set_to_none=True)
        ours.step_in_stage += 1

    t0 = time.perf_counter()
    for _ in range(3):  # compile + warm-up
        our_step()
    print(f"steplm warm-up (torch.compile) took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    hf_step()
    times = {"steplm": 0.0, "hf": 0.0}
    ours.data_seconds = 0.0
    for r in range(a.rounds):
        for name, fn in (("steplm", our_step), ("hf", hf_step)):
            t = time.perf_counter()
            for _ in range(a.steps):
                fn()
            times[name] += time.perf_counter() - t
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    n_tokens = a.rounds * a.steps * B * T
    res = {"config": "d256 L8 h4 V50257 batch 8x256", "threads": torch.get_num_threads(),
           "steplm_tokens_per_s": n_tokens / times["steplm"], "hf_eager_fp32_tokens_per_s": n_tokens / times["hf"],
           "data_wait_fraction": ours.data_seconds / times["steplm"], "dtype": str(ours.dtype), "compile": True}
    res["ratio"] = res["steplm_tokens_per_s"] / res["hf_eager_fp32_tokens_per_s"]
    print(f"steplm (bf16 autocast + torch.compile): {res['steplm_tokens_per_s']:,.0f} tok/s")
    print(f"HF LlamaForCausalLM eager fp32:        {res['hf_eager_fp32_tokens_per_s']:,.0f} tok/s")
    print(f"ratio steplm / HF: {res['ratio']:.2f}x   (target >= 2.5x)")
    print(f"steplm step time waiting for data: {100 * res['data_wait_fraction']:.2f} %   (target < 2 %)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
