"""Sampling: filters, cached and guided decoding, seeds, reranking, inpainting, variations, errors."""

import pytest
import torch
from PIL import Image

from clipdalle.clip import CLIP, CLIPConfig
from clipdalle.models.dalle import DALLE, PAD_ID, DALLEConfig, empty_captions
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.sampling import (
    Decoder,
    SampleNoise,
    best_per_group,
    blend_weights,
    cells_in_region,
    choose_codes,
    clip_scores,
    code_log_probs,
    consensus,
    encode_prompts,
    generate,
    guided_logits,
    inpaint,
    mask_from_image,
    region_mask,
    sample_codes,
    shortlisted_per_group,
    top_k_filter,
    top_p_filter,
    variations,
)
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.training.objectives import dalle_loss as loss_fn

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a black cross"]
TEXT_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, 270)


@pytest.fixture(scope="module")
def vae() -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig(image_size=16, n_downsample=2, vocab_size=16, n_embd=16, n_hidden=16)).eval()


def make_model(tokenizer, **changes) -> DALLE:
    values = dict(
        text_length=TEXT_LENGTH,
        text_vocab_size=tokenizer.vocab_size,
        image_vocab_size=16,
        grid_size=4,
        n_layer=2,
        n_head=2,
        n_embd=16,
        attn=["full", "conv"],
        conv_kernel=3,
    )
    values.update(changes)
    torch.manual_seed(0)
    return DALLE(DALLEConfig(**values)).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> DALLE:
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model that has memorised one random code grid per caption (and the empty caption's own grid)."""
    model = make_model(tokenizer, n_embd=32, caption_dropout=0.0)
    codes = torch.randint(0, 16, (5, 16), generator=torch.Generator().manual_seed(0))
    text = torch.cat([tokenizer.encode(CAPTIONS, TEXT_LENGTH), empty_captions(1, model.config)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(80):
        loss, _ = loss_fn(model, {"text": text, "codes": codes}, step / 80)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), codes


# ------------------------------------------------------------------------------------------ pure functions


def test_top_k_keeps_the_k_largest_image_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 9.0, 1.0, 8.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 5), logits) and torch.equal(top_k_filter(logits, 900), logits)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        top_k_filter(logits, 0)


def test_top_p_keeps_the_smallest_nucleus():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 0.75).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logits, 0.01).isfinite().tolist() == [[True, False, False, False]]  # never empty
    shuffled = logits[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.75).isfinite().tolist() == [[False, True, False, True]]


def test_choose_codes_greedy_temperature_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    noise = torch.tensor([[0.0, 0.0, 10.0], [0.0, 5.0, 0.0]])
    assert choose_codes(logits, noise, temperature=0).tolist() == [1, 0]  # greedy ignores noise
    assert choose_codes(logits, noise).tolist() == [2, 1]
    assert choose_codes(logits, noise, top_k=1).tolist() == [1, 0]  # filtered codes are never drawn
    assert torch.equal(guided_logits(logits, noise, 0.0), noise)
    torch.testing.assert_close(guided_logits(logits, noise, 3.0), noise + 3 * (logits - noise))


def test_gumbel_sampling_matches_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    noise = SampleNoise(range(20000), 3, 1).at(0)
    counts = torch.bincount(choose_codes(logits, noise), minlength=3).float() / 20000
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.015, rtol=0)
    halved = torch.bincount(choose_codes(logits, noise, temperature=2.0), minlength=3).float() / 20000
    torch.testing.assert_close(halved, (logits[0] / 2).softmax(-1), atol=0.015, rtol=0)


def test_sample_noise_depends_only_on_the_seed():
    alone = SampleNoise([7], 40, 16)
    batched = SampleNoise([3, 7, 9], 40, 16)
    for index in (0, 1, 5):
        assert torch.equal(alone.at(index)[0], batched.at(index)[1])
    assert not torch.equal(batched.at(5)[0], batched.at(5)[1])
    big = SampleNoise([7], 70000, 16)  # one code index per chunk; skipping indices still aligns the stream
    skipped, stepped = big.at(2), SampleNoise([7], 70000, 16)
    stepped.at(0), stepped.at(1)
    assert torch.equal(skipped, stepped.at(2))


def test_sample_noise_is_drawn_on_the_cpu_and_finished_on_the_device():
    # CPU generators on every device (the same samples per seed anywhere); the logarithms run where the logits are.
    assert SampleNoise([7], 40, 16, device="meta").at(3).device.type == "meta"
    logits = torch.randn(3, 40)
    half = code_log_probs(logits.bfloat16(), torch.tensor([0, 5, 9]))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, code_log_probs(logits.bfloat16().float(), torch.tensor([0, 5, 9])))


def test_best_per_group_orders_each_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 3.0, 1.0, 2.0])
    assert best_per_group(scores, 3, 2).tolist() == [1, 2, 3, 5]


def test_a_shortlist_keeps_the_most_typical_of_clips_best():
    # One prompt's four samples: CLIP scores sample 0 highest, but it looks like none of the others (an outlier);
    # samples 1 to 3 agree with each other. Shortlisting two keeps sample 1, the more typical of CLIP's best two.
    features = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [1.0, 0.0, 0.1]]), dim=1
    )
    scores = torch.tensor([0.9, 0.8, 0.1, 0.0])
    typical = consensus(features, 4)
    assert typical.argmin() == 0 and (typical[1:] > typical[0] + 0.5).all()
    torch.testing.assert_close(consensus(features[:1], 1), torch.zeros(1))  # nothing to agree with
    assert shortlisted_per_group(scores, features, 4, 1, 1).tolist() == [0]  # shortlist 1: CLIP's best
    assert shortlisted_per_group(scores, features, 4, 1, 2).tolist() == [1]
    assert shortlisted_per_group(scores, features, 4, 1, 3).tolist() == [1]  # 2 is typical too, but CLIP's third
    # keep 2 of a shortlist of 4: the three that agree come first; a second group is indexed after the first
    both = shortlisted_per_group(torch.cat([scores, scores]), torch.cat([features, features]), 4, 2, 2)
    assert both[:1].tolist() == both[2:3].sub(4).tolist() and 0 not in both.tolist() and 4 not in both.tolist()
    # a shortlist longer than the group is the whole group
    assert shortlisted_per_group(scores, features, 4, 3, 5).sort().values.tolist() == [1, 2, 3]


def test_regions_cells_and_blending():
    mask = region_mask((4, 2, 9, 7), 16, 16)
    assert mask.sum() == 5 * 5 and mask[2, 4] and not mask[7, 4] and not mask[2, 9]
    assert cells_in_region(mask, 4).nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    weights = blend_weights(mask, 2)
    assert (weights[~mask] == 0).all() and (weights[mask] > 0.3).all() and weights[4, 6] == 1.0  # centre: 1
    assert torch.equal(region_mask(mask.float(), 16, 16), mask)
    with pytest.raises(ValueError, match="not inside the 16 x 16 image"):
        region_mask((10, 10, 20, 12), 16, 16)
    with pytest.raises(ValueError, match="not inside"):
        region_mask((5, 5, 5, 9), 16, 16)
    with pytest.raises(ValueError, match="selects no pixels"):
        region_mask(torch.zeros(16, 16), 16, 16)
    with pytest.raises(ValueError, match=r"expected \(16, 16\)"):
        region_mask(torch.ones(8, 8), 16, 16)


def test_mask_from_image_reads_transparency_or_white(tmp_path):
    picture = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 16, 8))  # a transparent 16 x 8 block at the top left
    picture.save(tmp_path / "mask.png")
    mask = mask_from_image(tmp_path / "mask.png", 16)
    assert mask.shape == (16, 16) and mask[:4, :8].all() and mask.sum() == 32
    white = Image.new("RGB", (16, 16), "black")
    white.paste((255, 255, 255), (8, 8, 16, 16))
    white.paste((255, 255, 0), (0, 0, 8, 8))  # yellow is not white
    assert mask_from_image(white, 16).sum() == 64 and mask_from_image(white, 16)[8:, 8:].all()


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_decoding_equals_full_forward_at_every_step(model, tokenizer, cond_scale):
    text = encode_prompts(tokenizer, ["a red circle", "a blue square"], TEXT_LENGTH)
    codes = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cond_full = model(text, codes)
        _, uncond_full = model(empty_captions(2, model.config), codes)
    expected = guided_logits(cond_full, uncond_full, cond_scale) if cond_scale != 1 else cond_full
    decoder = Decoder(model, text, cond_scale)
    logits, cond = decoder.start()
    steps, conds = [logits], [cond]
    for cell in range(15):
        logits, cond = decoder.extend(codes[:, cell : cell + 1], cell)
        steps.append(logits)
        conds.append(cond)
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(conds, 1), cond_full, atol=1e-5, rtol=1e-5)
    assert decoder.caches[0].keys.shape[0] == (4 if cond_scale != 1 else 2)  # own cache rows per stream


def reference_sample(model, text, seeds, cond_scale=1.0, top_k=None, temperature=1.0):
    """Sampling without a cache: a full forward pass per code."""
    noise = SampleNoise(seeds, model.config.image_vocab_size, model.config.image_length)
    codes = torch.zeros(text.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for cell in range(model.config.image_length):
            logits = model(text, codes)[1][:, cell]
            if cond_scale != 1:
                uncond = model(empty_captions(text.shape[0], model.config), codes)[1][:, cell]
                logits = guided_logits(logits, uncond, cond_scale)
            chosen = choose_codes(logits, noise.at(cell), temperature, top_k)
            codes = torch.cat([codes, chosen[:, None]], dim=1)
    return codes


@pytest.mark.parametrize("cond_scale", [1.0, 2.5])
def test_sampling_equals_uncached_reference(model, tokenizer, cond_scale):
    text = encode_prompts(tokenizer, ["a red circle", "a blue square", ""], TEXT_LENGTH)
    seeds = [11, 12, 13]
    codes, log_likelihood = sample_codes(model, text, seeds, cond_scale=cond_scale, top_k=8)
    assert torch.equal(codes, reference_sample(model, text, seeds, cond_scale, top_k=8))
    with torch.no_grad():
        log_probs = model(text, codes)[1].log_softmax(-1)  # conditional, unfiltered
    expected = log_probs.gather(2, codes[..., None])[..., 0].sum(1)
    torch.testing.assert_close(log_likelihood, expected, atol=1e-4, rtol=1e-5)


def test_guidance_at_scale_one_is_plain_sampling(model, vae, tokenizer):
    plain = generate(model, vae, tokenizer, ["a red circle"], n=3, seed=4)
    guided = generate(model, vae, tokenizer, ["a red circle"], n=3, seed=4, cond_scale=1.0)
    text = encode_prompts(tokenizer, ["a red circle"] * 3, TEXT_LENGTH)
    reference = reference_sample(model, text, [4, 5, 6])
    assert torch.equal(plain.codes, guided.codes)
    assert sorted(map(tuple, plain.codes.reshape(3, -1).tolist())) == sorted(map(tuple, reference.tolist()))


def test_overfit_model_reproduces_its_codes_from_captions(trained, vae, tokenizer):
    model, codes = trained
    greedy = generate(model, vae, tokenizer, CAPTIONS + [""], temperature=0, batch_size=2)
    assert torch.equal(greedy.codes.reshape(5, -1), codes)
    cool = generate(model, vae, tokenizer, CAPTIONS, temperature=0.3, seed=0)
    assert (cool.codes.reshape(4, -1) == codes[:4]).float().mean() > 0.95
    assert greedy.images.shape == (5, 3, 16, 16) and 0 <= greedy.images.min() and greedy.images.max() <= 1
    torch.testing.assert_close(greedy.images[:4], vae.decode(codes[:4].view(4, 4, 4)))


def test_generation_contract_and_seeds(model, vae, tokenizer):
    first = generate(model, vae, tokenizer, ["a red circle", "a blue square"], n=4, keep=2, seed=100, top_p=0.9)
    again = generate(model, vae, tokenizer, ["a red circle", "a blue square"], n=4, keep=2, seed=100, top_p=0.9)
    assert torch.equal(first.codes, again.codes) and first.seeds == again.seeds
    assert first.codes.shape == (4, 4, 4) and first.codes.dtype == torch.long
    assert first.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert set(first.seeds[:2]) <= {100, 101, 102, 103} and set(first.seeds[2:]) <= {104, 105, 106, 107}
    assert first.clip_scores is None
    for index in range(2):  # ranked by log-likelihood without CLIP, best first per prompt
        assert first.log_likelihood[2 * index] >= first.log_likelihood[2 * index + 1]
    assert (first.log_likelihood < 0).all()
    single = generate(model, vae, tokenizer, first.prompts[2], seed=first.seeds[2], top_p=0.9)
    assert torch.equal(single.codes[0], first.codes[2])  # a recorded seed regenerates its sample alone
    other = generate(model, vae, tokenizer, ["a red circle", "a blue square"], n=4, keep=2, seed=200, top_p=0.9)
    assert not torch.equal(other.codes, first.codes)
    unseeded = generate(model, vae, tokenizer, "a red circle")
    assert len(unseeded.seeds) == 1


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=5.0), dict(temperature=0.0), dict(top_k=1), dict(top_p=0.01), dict(cond_scale=3.0)],
    ids=["hot", "greedy", "top-1", "top-p", "guided"],
)
def test_every_setting_draws_codes_of_the_codebook_that_decode_to_the_images(model, vae, tokenizer, settings):
    result = generate(model, vae, tokenizer, ["a red circle", ""], n=3, seed=0, **settings)
    grid = vae.config.grid_size
    assert result.codes.shape == (6, grid, grid) and result.codes.dtype == torch.long
    assert 0 <= int(result.codes.min()) and int(result.codes.max()) < vae.config.vocab_size
    torch.testing.assert_close(result.images, vae.decode(result.codes))
    assert torch.isfinite(result.log_likelihood).all() and (result.log_likelihood <= 0).all()


def tiny_clip(tokenizer) -> tuple:
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16, image_size=32, vision_patch_size=8, vision_n_layer=1, vision_n_embd=16, vision_n_head=2,
        context_length=16, vocab_size=tokenizer.vocab_size, text_n_layer=1, text_n_embd=16, text_n_head=2,
        activation="gelu", text_pooling="first_eos", eos_id=tokenizer.eos_id,
    )  # fmt: skip
    return CLIP(config).eval(), None, tokenizer


def test_reranking_keeps_the_top_clip_scores(model, vae, tokenizer):
    clip = tiny_clip(tokenizer)
    everything = generate(model, vae, tokenizer, ["a red circle", "a blue square"], n=6, keep=6, clip=clip, seed=9)
    best = generate(model, vae, tokenizer, ["a red circle", "a blue square"], n=6, keep=3, clip=clip, seed=9)
    assert best.clip_scores is not None and best.clip_scores.shape == (6,)
    for group in range(2):
        scores = best.clip_scores[3 * group : 3 * group + 3]
        assert torch.equal(scores, scores.sort(descending=True).values)
        top = everything.clip_scores[6 * group : 6 * group + 6].sort(descending=True).values[:3]
        torch.testing.assert_close(scores, top)
        assert best.seeds[3 * group : 3 * group + 3] == everything.seeds[6 * group : 6 * group + 3]
    rescored = clip_scores(clip, best.images, best.prompts)
    torch.testing.assert_close(rescored, best.clip_scores)
    with pytest.raises(ValueError, match="bundle returned by clipdalle.clip.load"):
        generate(model, vae, tokenizer, "a red circle", n=2, clip=clip[0])


def test_generate_with_a_shortlist_keeps_the_most_typical_of_clips_best_two(model, vae, tokenizer):
    clip = tiny_clip(tokenizer)
    prompts = ["a red circle", "a blue square"]
    everything = generate(model, vae, tokenizer, prompts, n=6, keep=6, clip=clip, seed=9, temperature=2.0)
    kept = generate(model, vae, tokenizer, prompts, n=6, keep=1, clip=clip, seed=9, temperature=2.0, shortlist=2)
    assert kept.images.shape[0] == 2 and kept.clip_features.shape == (2, 16)
    for group in range(2):
        rows = slice(6 * group, 6 * group + 6)
        seeds = everything.seeds[rows]  # CLIP's best first
        typical = consensus(everything.clip_features[rows], 6)  # (6,) each sample against the other five
        assert kept.seeds[group] == (seeds[0] if typical[0] >= typical[1] else seeds[1])
    if all(kept.seeds[group] == everything.seeds[6 * group] for group in range(2)):
        pytest.fail("the shortlist changed nothing here; pick a seed where an outlier leads CLIP's ranking")
    torch.testing.assert_close(clip_scores(clip, kept.images, kept.prompts), kept.clip_scores)
    with pytest.raises(ValueError, match="shortlist=2 needs a CLIP"):
        generate(model, vae, tokenizer, "a red circle", n=4, shortlist=2)
    with pytest.raises(ValueError, match="shortlist must be a whole number >= 1"):
        generate(model, vae, tokenizer, "a red circle", n=4, clip=clip, shortlist=0)


def test_inpaint_keeps_codes_and_pixels_outside_the_region(trained, vae, tokenizer):
    model, _ = trained
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    box = (4, 0, 12, 8)  # x 4..11, y 0..7: cells (0, 1), (0, 2), (1, 1), (1, 2)
    result = inpaint(model, vae, tokenizer, image, box, "a blue square", n=6, keep=3, seed=3, temperature=2.0)
    original = vae.encode(image[None])[0]  # (4, 4)
    cells = cells_in_region(region_mask(box, 16, 16), 4)
    assert result.codes.shape == (3, 4, 4)
    assert (result.codes[:, ~cells] == original[~cells]).all()
    assert (result.codes[:, cells] != original[cells]).any()
    mask = region_mask(box, 16, 16)
    assert torch.equal(result.images[:, :, ~mask], image[None].expand(3, -1, -1, -1)[:, :, ~mask])
    decoded = vae.decode(result.codes)
    interior = torch.zeros(16, 16, dtype=torch.bool)
    interior[2:6, 6:10] = True  # deeper than the blend radius (1 pixel)
    torch.testing.assert_close(result.images[:, :, interior], decoded[:, :, interior])
    assert (result.log_likelihood[:-1] >= result.log_likelihood[1:]).all()  # whole-sequence likelihood, best first
    with torch.no_grad():
        text = encode_prompts(tokenizer, ["a blue square"] * 3, TEXT_LENGTH)
        full = model(text, result.codes.reshape(3, -1))[1].log_softmax(-1)
    expected = full.gather(2, result.codes.reshape(3, -1, 1))[..., 0].sum(1)
    torch.testing.assert_close(result.log_likelihood, expected, atol=1e-4, rtol=1e-5)
    masked = inpaint(model, vae, tokenizer, image, mask, "a blue square", n=6, keep=3, seed=3, temperature=2.0)
    assert torch.equal(masked.codes, result.codes)


def test_variations_keep_the_top_rows(trained, vae, tokenizer):
    model, codes = trained
    image = vae.decode(codes[:1].view(1, 4, 4))[0]
    original = vae.encode(image[None])[0]
    result = variations(model, vae, tokenizer, image, "a green triangle", n=4, keep_rows=1, seed=0, temperature=3.0)
    assert result.codes.shape == (4, 4, 4)
    assert (result.codes[:, :1] == original[:1]).all() and (result.codes[:, 1:] != original[1:]).any()
    torch.testing.assert_close(result.images, vae.decode(result.codes))
    with pytest.raises(ValueError, match="keep_rows=4 must be between 0 and 3"):
        variations(model, vae, tokenizer, image, "x", keep_rows=4)


def test_prompts_truncated_with_a_warning_and_empty_is_unconditional(model, vae, tokenizer):
    long_prompt = " ".join(["a red circle"] * 10)
    with pytest.warns(UserWarning, match="longer than the model's 16 text tokens; it was truncated"):
        text = encode_prompts(tokenizer, [long_prompt, "", "   "], TEXT_LENGTH)
    assert torch.equal(text[0], tokenizer.encode(long_prompt, TEXT_LENGTH)[0])
    assert (text[1:] == PAD_ID).all()  # the empty caption caption dropout trained
    empty = generate(model, vae, tokenizer, "", n=2, seed=1)
    codes, _ = sample_codes(model, empty_captions(2, model.config), [1, 2])
    assert sorted(map(tuple, empty.codes.reshape(2, -1).tolist())) == sorted(map(tuple, codes.tolist()))


def test_errors_are_clear(model, vae, tokenizer):
    image = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="keep=5 must be between 1 and n=3"):
        generate(model, vae, tokenizer, "a red circle", n=3, keep=5)
    with pytest.raises(ValueError, match="got no prompts"):
        generate(model, vae, tokenizer, [])
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, vae, tokenizer, "a red circle", top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, vae, tokenizer, "a red circle", temperature=-1.0)
    with pytest.raises(ValueError, match="not inside the 16 x 16 image"):
        inpaint(model, vae, tokenizer, image, (0, 0, 17, 8), "a red circle")
    with pytest.raises(ValueError, match="smaller than one 4 x 4 cell"):
        inpaint(model, vae, tokenizer, image, (0, 0, 3, 3), "a red circle")
    with pytest.raises(ValueError, match=r"expected one image of shape \(3, 16, 16\)"):
        inpaint(model, vae, tokenizer, torch.rand(3, 32, 32), (0, 0, 8, 8), "a red circle")
    other_vae = DiscreteVAE(DVAEConfig(image_size=16, n_downsample=2, vocab_size=32, n_embd=16, n_hidden=16))
    with pytest.raises(ValueError, match="does not match the DALL·E model"):
        generate(model, other_vae, tokenizer, "a red circle")
    with pytest.raises(ValueError, match="expected a DALL·E model"):
        generate(vae, vae, tokenizer, "a red circle")
