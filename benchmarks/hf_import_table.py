"""Issue #13's table, re-run: `steplm eval DIR --backend steplm` against `--backend transformers` on
4096 tokens of wikitext2/valid.txt, for tiny random LlamaForCausalLM models saved with save_pretrained,
one per config feature that released Llama-family models use.

Each row is either equal losses or steplm's one-line refusal (exit 2). The column "feature dropped"
is steplm's loss with the feature ignored (what steplm did before), to show that each row can differ.
Writes benchmarks/results/hf_import_table.{md,json}; takes about three minutes on 2 CPU cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from steplm.cli import main as steplm_main  # noqa: E402

# Llama 3.1's RoPE scaled down with the model: 128 original positions where Llama 3.1 had 8192.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128}


def gpt2_tokenizer():
    from tokenizers.implementations import ByteLevelBPETokenizer
    d = SHARED / "tokenizers" / "gpt2"
    return ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))._tokenizer


def llama2_style_tokenizer():
    """A 4096-token Metaspace BPE with <unk>, <s>, </s> and a template that prepends <s>; no <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = (SHARED / "shakespeare" / "input.txt").read_text()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def build(path: Path, llama_tok=False, legacy_rope=None, own_lm_head=False, **cfg_kw):
    tok = llama2_style_tokenizer() if llama_tok else gpt2_tokenizer()
    eos, bos = ("</s>", "<s>") if llama_tok else ("<|endoftext|>", "<|endoftext|>")
    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=512, initializer_range=0.2,
              bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
    kw.update(cfg_kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(path))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                            unk_token="<unk>" if llama_tok else eos).save_pretrained(str(path))
    cfg = json.loads((path / "config.json").read_text())
    if legacy_rope is not None:
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = legacy_rope
    (path / "config.json").write_text(json.dumps(cfg))
    if own_lm_head:
        state = load_file(str(path / "model.safetensors"))
        state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"]) * 0.05
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


ROWS = [  # (feature, how to build it, what steplm used to ignore: rope / bias / head / None)
    ("plain control", {}, None),
    ("GQA (2 kv heads), rope_theta 5e5", {"num_key_value_heads": 2,
                                          "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, None),
    ("tie_word_embeddings true (genuinely tied)", {"tie_word_embeddings": True}, None),
    ("rope llama3 factor 8, rope_parameters layout", {"rope_parameters": {**LLAMA31_ROPE, "rope_theta": 5e5}},
     "rope"),
    ("rope llama3 factor 8, legacy rope_scaling layout",
     {"legacy_rope": LLAMA31_ROPE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope"),
    ("rope linear factor 4", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}, "rope"),
    ("rope yarn factor 4", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                "original_max_position_embeddings": 128}}, "rope"),
    ("attention_bias true", {"attention_bias": True}, "bias"),
    ("mlp_bias true", {"mlp_bias": True}, "bias"),
    ("hidden_act gelu", {"hidden_act": "gelu"}, None),
    ("rope dynamic factor 2 (plain RoPE within max_position_embeddings)",
     {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, None),
    ("pretraining_tp 2 (not read by transformers 5)", {"pretraining_tp": 2}, None),
    ("sliding_window 16 (not read by LlamaForCausalLM)", {"sliding_window": 16}, None),
    ("head_dim 64, hidden 128, 4 heads", {"head_dim": 64}, None),
    ("tie_word_embeddings true, file has its own lm_head", {"tie_word_embeddings": True, "own_lm_head": True},
     "head"),
    ("tokenizer EOS </s> (Llama 2 / Mistral style)", {"llama_tok": True}, None),
]


def _dropped(model, drop: str):
    """``model`` with the ``drop`` feature ignored, as steplm computed it before issue #13."""
    import dataclasses

    from steplm.model.llama import from_state_dict
    if drop == "rope":
        return from_state_dict(dataclasses.replace(model.config, rope_scaling=None), dict(model.state_dict()))
    if drop == "bias":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
        return model
    with torch.no_grad():  # "head": the embedding used as the head
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


def dropped_loss(path: Path, drop: str, wiki: str) -> float:
    """Loss on the same 4096 tokens of the steplm model with the ``drop`` feature ignored."""
    from steplm.data.sampler import eval_windows
    from steplm.io.run_dir import load_model_dir
    from steplm.eval.perplexity import token_stream, windows_loss
    with contextlib.redirect_stderr(io.StringIO()):
        p = load_model_dir(path)
    model = _dropped(p.model, drop)
    stream = token_stream(wiki, lambda t: p.tokenizer.encode(t, add_special_tokens=False).ids, p.special.eos_id)
    total, count = windows_loss(model, eval_windows(stream, model.config.max_seq_len, 4096), 8)
    return total / count


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = steplm_main(args)
        except Exception as e:  # a traceback in the CLI: report it as such
            code, err = 1, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "Writing" not in ln and "Loading" not in ln]
    return code, out.getvalue(), "\n".join(lines)


def main():
    wiki = str(SHARED / "wikitext2" / "valid.txt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw, drop in ROWS:
            d = Path(tmp) / str(len(rows))
            build(d, **kw)
            row = {"feature": name}
            for backend in ("steplm", "transformers"):
                code, out, err = run(["eval", str(d), "--data", wiki, "--max-tokens", "4096", "--json",
                                      "--backend", backend])
                row[backend] = json.loads(out)["loss"] if code == 0 else None
                row[f"{backend}_exit"], row[f"{backend}_stderr"] = code, err
            row["feature_dropped"] = dropped_loss(d, drop, wiki) if drop and row["steplm"] is not None else None
            rows.append(row)
            print(name, row["steplm"], row["transformers"], row["steplm_stderr"], file=sys.stderr)
    md = ["| config feature | steplm | transformers | steplm, feature dropped | result |",
          "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ours = f"{r['steplm']:.6f}" if r["steplm"] is not None else f"exit {r['steplm_exit']}"
        theirs = f"{r['transformers']:.6f}" if r["transformers"] is not None else f"exit {r['transformers_exit']}"
        if r["steplm"] is not None and r["transformers"] is not None:
            diff = abs(r["steplm"] - r["transformers"])
            result = f"equal (abs diff {diff:.1e})" + (f"; warned: {r['steplm_stderr']}" if r["steplm_stderr"] else "")
        else:
            result = f"refused: `{r['steplm_stderr']}`"
        dropped = "" if r["feature_dropped"] is None else f"{r['feature_dropped']:.6f}"
        md.append(f"| {r['feature']} | {ours} | {theirs} | {dropped} | {result} |")
    out = ROOT / "benchmarks" / "results"
    (out / "hf_import_table.json").write_text(json.dumps(rows, indent=2))
    (out / "hf_import_table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
