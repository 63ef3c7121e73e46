"""Caption generation: official decoding protocol (golden step logits), beam search vs. a per-example
restatement of the official loop, beam 1 == greedy, cached == uncached, batched == one image at a time."""

import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN_CONFIG, load_golden

import multiway
from multiway.model.generation import _Stepper, beam_search, generate, greedy_search

MASK_ID = 999  # golden captioner (vocab 1000)
MASK = 39  # peaky captioners (vocab 40)
EOS = 2


def golden_captioner():
    sd, inputs, outputs = load_golden("captioning")
    model = multiway.create_model("beit3_base_patch16_224_captioning", **GOLDEN_CONFIG)
    multiway.load_checkpoint(model, sd)
    return model.eval(), inputs, outputs


def peaky_captioner(seed: int = 0, eos_bias: float = 4.0):
    """A random tiny captioner whose word distributions are sharp and that emits </s> now and then."""
    torch.manual_seed(seed)
    model = multiway.create_model("beit3_tiny_patch8_32_captioning", vocab_size=40).eval()
    with torch.no_grad():
        model.mlm_head.weight.mul_(60)
        model.mlm_head.bias[EOS] = eos_bias
    return model


def official_beam_search(model, image, num_beams, max_len, length_penalty, early_stopping=False):
    """Per-example restatement of the official CaptioningHandler loop (no cache; recomputes each step)."""
    results = []
    for b in range(image.shape[0]):
        img = image[b : b + 1]
        beams = [([0], 0.0)] + [([0], -1e9)] * (num_beams - 1)
        hyp = None  # (score, tokens)
        for cur_len in range(2, max_len + 1):
            ids = torch.tensor([t + [MASK] for t, _ in beams])
            logits, _ = model(img.expand(len(beams), -1, -1, -1), ids)
            logp = F.log_softmax(logits[:, -1].float(), dim=-1)
            total = (logp + torch.tensor([s for _, s in beams])[:, None]).view(-1)
            scores, idx = total.topk(3 * num_beams)
            if hyp is not None and (early_stopping or hyp[0] >= scores.max().item() / (max_len - 1) ** length_penalty):
                break
            nxt = []
            for s, i in zip(scores.tolist(), idx.tolist()):
                beam, word = divmod(i, logp.shape[-1])
                if (word == EOS and cur_len + 1 <= max_len) or cur_len + 1 == max_len:
                    score = s / cur_len**length_penalty
                    if hyp is None or score > hyp[0]:
                        hyp = (score, beams[beam][0] + [EOS])
                else:
                    nxt.append((beams[beam][0] + [word], s))
                if len(nxt) == num_beams:
                    break
            if cur_len + 1 == max_len:
                break
            beams = nxt
        results.append(hyp)
    return results


@torch.no_grad()
def test_stepper_matches_golden_decoding_steps():
    model, i, o = golden_captioner()
    stepper = _Stepper(model, i["image"], MASK_ID, use_cache=True)
    step1 = stepper.first(i["decode_step1_ids"][:, :1])
    torch.testing.assert_close(step1, F.log_softmax(o["decode_step1_logits"][:, 1], -1), atol=1e-5, rtol=0)
    prefix = torch.cat([i["decode_step1_ids"][:, :1], i["decode_step2_ids"][:, :1]], dim=1)  # <s> w1
    step2 = stepper.next(prefix)
    torch.testing.assert_close(step2, F.log_softmax(o["decode_step2_logits"][:, 1], -1), atol=1e-5, rtol=0)
    assert len(stepper.cache) == model.config.num_vision_tokens + 2  # image + <s> + w1, <mask> slots dropped


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_matches_official_loop(num_beams, early_stopping):
    model = peaky_captioner(seed=1)
    image = torch.randn(4, 3, 32, 32)
    out = beam_search(model, image, MASK, num_beams=num_beams, max_len=9, length_penalty=0.6, early_stopping=early_stopping)
    with torch.no_grad():
        ref = official_beam_search(model, image, num_beams, 9, 0.6, early_stopping)
    for b, (score, toks) in enumerate(ref):
        assert out.sequences[b, : len(toks)].tolist() == toks
        assert (out.sequences[b, len(toks) :] == 1).all()
        assert out.scores[b].item() == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_one_with_early_stopping_equals_greedy(use_cache):
    model = peaky_captioner(seed=2)
    image = torch.randn(5, 3, 32, 32)
    g = generate(model, image, MASK, num_beams=1, max_len=10, strategy="greedy", use_cache=use_cache)
    assert torch.equal(g.sequences, greedy_search(model, image, MASK, max_len=10, use_cache=use_cache).sequences)
    b = beam_search(model, image, MASK, num_beams=1, max_len=10, early_stopping=True, use_cache=use_cache)
    assert torch.equal(g.sequences, b.sequences)
    torch.testing.assert_close(g.scores, b.scores)
    lengths = (g.sequences != 1).sum(1)
    assert lengths.min() < 10 and lengths.max() >= 3  # some stop early on </s>, all have <s> w </s>


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_equals_uncached(num_beams):
    model = peaky_captioner(seed=3, eos_bias=2.0)
    image = torch.randn(3, 3, 32, 32)
    a = generate(model, image, MASK, num_beams=num_beams, max_len=8, use_cache=True)
    b = generate(model, image, MASK, num_beams=num_beams, max_len=8, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_batched_equals_one_at_a_time():
    model = peaky_captioner(seed=4)
    image = torch.randn(4, 3, 32, 32)
    batched = beam_search(model, image, MASK, num_beams=3, max_len=9)
    for b in range(4):
        single = beam_search(model, image[b : b + 1], MASK, num_beams=3, max_len=9)
        assert torch.equal(batched.sequences[b], single.sequences[0])


def test_golden_model_generates_official_shapes():
    model, i, _ = golden_captioner()
    out = generate(model, i["image"], MASK_ID, num_beams=3, max_len=6)
    assert out.sequences.shape == (2, 6)
    assert (out.sequences[:, 0] == 0).all()
    assert ((out.sequences == EOS).sum(1) == 1).all()


def test_bad_inputs_raise_clear_errors():
    model = peaky_captioner()
    with pytest.raises(ValueError, match="max_len"):
        generate(model, torch.randn(1, 3, 32, 32), MASK, max_len=2)
    with pytest.raises(ValueError, match="max_text_positions"):
        generate(model, torch.randn(1, 3, 32, 32), MASK, max_len=200)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        generate(model, torch.randn(3, 32, 32), MASK)
    with pytest.raises(TypeError, match="BEiT3ForCaptioning"):
        generate(multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=3), torch.randn(1, 3, 32, 32), MASK)
    image = torch.randn(2, 3, 32, 32)
    cases = [
        (dict(image=image.long()), TypeError, "float tensor"),
        (dict(image=image[:0]), ValueError, "empty batch"),
        (dict(image=torch.randn(2, 1, 32, 32)), ValueError, "image has 1 channels but the model takes 3"),
        (dict(image=torch.randn(2, 3, 48, 48)), ValueError, "48x48 but the model was built for 32x32"),
        (dict(mask_id=40), ValueError, r"mask_id must be a token id in \[0, 40\)"),
        (dict(mask_id=-1), ValueError, "mask_id"),
        (dict(num_beams=0), ValueError, "num_beams must be an int >= 1, got 0"),
        (dict(num_beams=2.0), ValueError, "num_beams must be an int"),
        (dict(max_len=8.0), TypeError, "max_len must be an int"),
        (dict(length_penalty=float("nan")), ValueError, "length_penalty must be a finite number"),
        (dict(vocab_limit=41), ValueError, r"vocab_limit must be in \[3, 40\]"),
        (dict(strategy="sample"), ValueError, "strategy must be 'beam' or 'greedy'"),
        (dict(strategy="greedy", num_beams=3), ValueError, "num_beams must be 1"),
        (dict(strategy="greedy", num_beams=1, early_stopping=True), TypeError, "early_stopping"),
    ]
    for kwargs, error, match in cases:
        args = {"image": image, "mask_id": MASK, **kwargs}
        with pytest.raises(error, match=match):
            generate(model, args.pop("image"), args.pop("mask_id"), **{"max_len": 8, **args})
