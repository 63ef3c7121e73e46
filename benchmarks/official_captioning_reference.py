"""Write the caption-decoding reference fixture from the official BEiT-3 captioning handler.

It runs unilm's ``CaptioningHandler.eval_batch`` (``beit3/engine_for_finetuning.py``, beam search with
``utils.BeamHypotheses``) on the official ``BEiT3ForCaptioning`` (``beit3/modeling_finetune.py`` on torchscale),
with small random models whose LM head is sharpened and whose ``</s>`` logit is biased so that closing a
caption competes with the words. ``tests/test_generation_reference.py`` decodes the same images with the same
weights through :func:`multiway.model.generation.generate` and compares the captions token for token.

Run in the torchscale environment (``../shared/tools/make-torchscale-venv.sh``) with a checkout of
microsoft/unilm (only its ``beit3/`` folder is used; its training-only imports are stubbed below):

    /tmp/torchscale-venv/bin/python benchmarks/official_captioning_reference.py /path/to/unilm/beit3 \\
        tests/fixtures/official_captioning.safetensors

The file holds, per model ``m``: its weights in the official key layout (``m<m>.state_dict.*``), the images
(``input.images``) and, per setting, the handler's captions as word ids without special tokens, right-padded
with -1 (``m<m>.beams<k>.len<L>.lp<p>``, (images, L)). The settings and model configs are in the metadata.
"""

import json
import math
import sys
import types
from argparse import Namespace

import torch
from safetensors.torch import save_file

CONFIG = dict(depth=2, embed_dim=64, num_heads=4, ffn_dim=128, img_size=32, patch_size=8, vocab_size=48, max_text_positions=40)
MASK_ID = CONFIG["vocab_size"] - 1
# (seed, LM-head scale, </s> bias): a sharpened head gives confident words; the bias makes </s> a contender.
MODELS = [(11, 40.0, 3.0), (12, 60.0, 5.0), (13, 25.0, 1.5)]
NUM_IMAGES = 12
SETTINGS = [(beams, max_len, lp) for beams in (1, 2, 3, 4) for max_len in (5, 9, 16) for lp in (0.0, 0.6, 1.0, 2.0)]


class RecordingTokenizer:
    """Stands in for the XLM-R tokenizer: the specials the handler reads, and a ``batch_decode`` that keeps the
    word ids of the best hypotheses (specials dropped, as ``skip_special_tokens=True`` does)."""

    cls_token_id, pad_token_id, sep_token_id, mask_token_id = 0, 1, 2, MASK_ID

    def __init__(self) -> None:
        self.decoded: list[list[int]] = []

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        special = {self.cls_token_id, self.pad_token_id, self.sep_token_id, self.mask_token_id}
        rows = [[int(t) for t in row if int(t) not in special] for row in ids.reshape(-1, ids.shape[-1])]
        self.decoded.extend(rows)
        return [" ".join(map(str, r)) for r in rows]


def import_official(beit3_dir: str, tokenizer: RecordingTokenizer):
    """Import the official modules, stubbing what only their training and logging code needs."""
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    sys.modules.setdefault("torch._six", six)
    for name, attr in (("torchmetrics", "Metric"), ("tensorboardX", "SummaryWriter")):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            setattr(stub, attr, type(attr, (torch.nn.Module,), {}))
            sys.modules[name] = stub
    datasets = types.ModuleType("datasets")  # the handler only takes its tokenizer from here
    datasets.get_sentencepiece_model_for_beit3 = lambda args: tokenizer
    sys.modules["datasets"] = datasets
    sys.path.insert(0, beit3_dir)
    import engine_for_finetuning
    import modeling_finetune
    import modeling_utils

    return engine_for_finetuning, modeling_finetune, modeling_utils


def build_official_model(modeling_finetune, modeling_utils, seed: int, head_scale: float, eos_bias: float):
    c = CONFIG
    args = modeling_utils._get_base_config(img_size=c["img_size"], patch_size=c["patch_size"], vocab_size=c["vocab_size"])
    args.encoder_layers, args.encoder_embed_dim = c["depth"], c["embed_dim"]
    args.encoder_attention_heads, args.encoder_ffn_embed_dim = c["num_heads"], c["ffn_dim"]
    args.max_source_positions = c["max_text_positions"]
    torch.manual_seed(seed)
    model = modeling_finetune.BEiT3ForCaptioning(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "ffn_layernorm" in name or "inner_attn_ln" in name:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorms, so expert routing matters
            if name.endswith(("q_proj.A.weight", "q_proj.B.weight", "k_proj.A.weight", "k_proj.B.weight")):
                p.mul_(4.0)  # sharper attention ...
            if name.endswith(("v_proj.A.weight", "v_proj.B.weight")):
                p.mul_(3.0)  # ... and larger values
            if "embed_positions" in name:
                p.mul_(0.05)  # N(0, 1) position tables would drown the patches and words: captions then depend on both
        model.mlm_head.weight.mul_(head_scale)
        model.mlm_head.bias[2] += eos_bias
    return model


def main(beit3_dir: str, out: str) -> None:
    tokenizer = RecordingTokenizer()
    engine, modeling_finetune, modeling_utils = import_official(beit3_dir, tokenizer)
    torch.manual_seed(0)
    images = torch.randn(NUM_IMAGES, 3, CONFIG["img_size"], CONFIG["img_size"])
    tensors = {"input.images": images}
    lengths = []
    for m, (seed, scale, bias) in enumerate(MODELS):
        model = build_official_model(modeling_finetune, modeling_utils, seed, scale, bias)
        tensors.update({f"m{m}.state_dict.{k}": v.contiguous() for k, v in model.state_dict().items()})
        for beams, max_len, lp in SETTINGS:
            args = Namespace(
                num_beams=beams, num_max_bpe_tokens=max_len, length_penalty=lp, vocab_size=CONFIG["vocab_size"],
                label_smoothing=0.1, drop_worst_ratio=0.2, drop_worst_after=0,
            )
            handler = engine.CaptioningHandler(args)
            tokenizer.decoded.clear()
            with torch.no_grad():
                handler.eval_batch(model, images, image_id=torch.arange(NUM_IMAGES))
            words = torch.full((NUM_IMAGES, max_len), -1, dtype=torch.long)
            for i, row in enumerate(tokenizer.decoded):
                words[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                lengths.append(len(row))
            tensors[f"m{m}.beams{beams}.len{max_len}.lp{lp}"] = words
    metadata = {
        "config": json.dumps(CONFIG),
        "mask_id": str(MASK_ID),
        "models": json.dumps(MODELS),
        "settings": json.dumps(SETTINGS),
        "source": "unilm beit3 CaptioningHandler.eval_batch on BEiT3ForCaptioning (torchscale)",
    }
    save_file(tensors, out, metadata=metadata)
    hist = torch.bincount(torch.tensor(lengths))
    distinct = [len({tuple(r.tolist()) for r in v}) for k, v in tensors.items() if ".beams" in k]
    print(f"wrote {out}: {len(MODELS)} models x {len(SETTINGS)} settings x {NUM_IMAGES} images")
    print(f"caption lengths (count per length 0..): {hist.tolist()}")
    print(f"distinct captions per setting (of {NUM_IMAGES}): mean {sum(distinct) / len(distinct):.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/official_captioning.safetensors")
