"""Write a fixture of the official backbone call's whole return dict, incremental decoding included.

Run with the torchscale environment (``../shared/tools/make-torchscale-venv.sh``):

    /tmp/torchscale-venv/bin/python benchmarks/torchscale_official_call.py tests/fixtures/torchscale_official_call.safetensors

It calls torchscale's ``BEiT3`` with its own keyword arguments (``textual_tokens``, ``visual_tokens``,
``text_padding_position``, ``attn_mask``, ``vision_masked_position``, ``incremental_state``, ``positions``) at a
config that no other fixture uses, and stores every entry of the returned dicts: ``encoder_out``,
``encoder_embedding``, ``encoder_padding_mask``, the number of ``l_aux`` entries and ``multiway_split_position``.
The decoding part follows the official captioning protocol: a fused first step with an empty cache and the
image-to-text mask, the last cached position dropped, then text-only steps at explicit positions.
``tests/test_official_call.py`` compares ``MultiwayTransformer(**official keywords)`` against it.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from torchscale.architecture.config import EncoderConfig
from torchscale.model.BEiT3 import BEiT3

CONFIG = dict(depth=3, embed_dim=48, num_heads=3, ffn_dim=120, img_size=40, patch_size=8, vocab_size=300, max_text_positions=24)
SEED, BATCH, TEXT_LEN = 2024, 2, 9


def main(out: str) -> None:
    torch.manual_seed(SEED)
    c = CONFIG
    args = EncoderConfig(
        vocab_size=c["vocab_size"], multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        encoder_embed_dim=c["embed_dim"], encoder_attention_heads=c["num_heads"], encoder_ffn_embed_dim=c["ffn_dim"],
        encoder_layers=c["depth"], img_size=c["img_size"], patch_size=c["patch_size"], in_chans=3,
        max_source_positions=c["max_text_positions"], drop_path_rate=0.0,
    )
    model = BEiT3(args).eval()
    with torch.no_grad():  # non-trivial norms, mask and class tokens, so routing or embedding mistakes show
        for name, p in model.named_parameters():
            if "layer_norm" in name or "ffn_layernorm" in name or "inner_attn_ln" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    image = torch.randn(BATCH, 3, c["img_size"], c["img_size"])
    ids = torch.randint(4, c["vocab_size"], (BATCH, TEXT_LEN))
    ids[:, 0] = 0
    pad = torch.zeros(BATCH, TEXT_LEN, dtype=torch.long)
    pad[1, 5:] = 1
    ids[pad.bool()] = 1
    num_patches = (c["img_size"] // c["patch_size"]) ** 2
    masked = torch.zeros(BATCH, num_patches, dtype=torch.long)
    masked[0, [0, 3, 7]] = 1
    masked[1, [2]] = 1
    n_img = num_patches + 1
    total = n_img + TEXT_LEN
    allowed = torch.zeros(total, total, dtype=torch.long)
    allowed[:n_img, :n_img] = 1
    allowed[n_img:, :n_img] = 1
    allowed[n_img:, n_img:] = torch.ones(TEXT_LEN, TEXT_LEN).tril()
    calls = {
        "vision": dict(visual_tokens=image),
        "vision_masked": dict(visual_tokens=image, vision_masked_position=masked),
        "text": dict(textual_tokens=ids, text_padding_position=pad),
        "text_unpadded": dict(textual_tokens=ids),
        "fused": dict(textual_tokens=ids, visual_tokens=image, text_padding_position=pad),
        "fused_unpadded": dict(textual_tokens=ids, visual_tokens=image),
        "fused_seq2seq": dict(textual_tokens=ids, visual_tokens=image, text_padding_position=pad, attn_mask=1 - allowed),
    }
    tensors: dict[str, torch.Tensor] = {}
    splits: dict[str, int] = {}
    with torch.no_grad():
        for name, kwargs in calls.items():
            result = model(**kwargs)
            tensors[f"output.{name}.encoder_out"] = result["encoder_out"]
            tensors[f"output.{name}.encoder_embedding"] = result["encoder_embedding"]
            tensors[f"output.{name}.encoder_padding_mask"] = result["encoder_padding_mask"].long()
            splits[name] = int(result["multiway_split_position"])
            assert result["encoder_states"] == [] and len(result["l_aux"]) == c["depth"]
        # Official captioning protocol: step 1 fused with an empty cache, then text-only steps at explicit positions.
        mask_id, words = c["vocab_size"] - 1, [7, 11, 13]
        state: dict = {i: {} for i in range(c["depth"])}
        first = torch.tensor([[0, mask_id]] * BATCH)
        uni = torch.zeros(n_img + 2, n_img + 2, dtype=torch.long)
        uni[:, :n_img] = 1
        uni[n_img:, n_img:] = torch.ones(2, 2).tril()
        uni[:n_img, n_img:] = 0
        step = model(textual_tokens=first, visual_tokens=image, attn_mask=1 - uni, incremental_state=state)
        tensors["output.decode_step1"] = step["encoder_out"]
        for layer in state.values():
            layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
        for n, word in enumerate(words, start=2):
            text = torch.tensor([[word, mask_id]] * BATCH)
            length = n_img + n + 1
            rows = torch.zeros(2, length, dtype=torch.long)
            rows[:, :n_img] = 1
            rows[0, n_img:n_img + n] = 1
            rows[1, n_img:n_img + n + 1] = 1
            positions = torch.arange(n + 1, n + 3).unsqueeze(0)  # text index + 2
            step = model(textual_tokens=text, attn_mask=1 - rows, incremental_state=state, positions=positions)
            tensors[f"output.decode_step{n}"] = step["encoder_out"]
            for layer in state.values():
                layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
        tensors["output.final_cache_key_layer0"] = state[0]["prev_key"]
    tensors.update({f"state_dict.{k}": v for k, v in model.state_dict().items()})
    tensors.update({"input.image": image, "input.text_ids": ids, "input.padding_mask": pad, "input.image_masked": masked,
                    "input.seq2seq_mask": 1 - allowed})
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}  # tied tables must not share storage in the file
    meta = {"config": json.dumps(CONFIG), "seed": str(SEED), "splits": json.dumps(splits), "mask_id": str(mask_id),
            "words": json.dumps(words), "source": "torchscale 0.3.0 BEiT3.forward"}
    save_file(tensors, out, metadata=meta)
    print(f"wrote {out}: {len(tensors)} tensors, splits {splits}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/torchscale_official_call.safetensors")
