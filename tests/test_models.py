"""otcclip.models: built-in models from scratch, fine-grained tokens, weights, transforms."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from otcclip import models as M

CAPTIONS = ["a shirt on the left and a bag!", "", "sneaker " * 40, "a red dress"]


@pytest.fixture(scope="module")
def tiny() -> M.ModelBundle:
    return M.create_model("otc-vit-tiny", seed=0)


@pytest.fixture(scope="module")
def rn() -> M.ModelBundle:
    return M.create_model("otc-rn-tiny", seed=0)


def _images(n: int, size: int = 56, rgb: bool = False, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_builtin_models_have_the_documented_shapes():
    expect = {
        "otc-vit-tiny": (56, 64, 64),
        "otc-vit-small": (56, 128, 64),
        "otc-rn-tiny": (128, 64, 16),
    }
    assert set(M.BUILTIN_MODELS) == set(expect)
    for name, (size, dim, patches) in expect.items():
        b = M.create_model(name)
        assert (b.name, b.image_size, b.embed_dim, b.context_length) == (name, size, dim, 32)
        pixels = M.image_transform(_images(2), b.image_size)
        with torch.no_grad():
            g, t = M.encode_image_fine(b.model, pixels)
        assert g.shape == (2, dim) and t.shape == (2, patches, dim)
        tokens = b.tokenizer(CAPTIONS)
        assert tokens.shape == (4, 32) and tokens.dtype == torch.long


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vit_fine_global_equals_encode_image(tiny, mode):
    model = tiny.model.train(mode == "train")
    pixels = M.image_transform(_images(3), tiny.image_size)
    with torch.no_grad():
        g, t = M.encode_image_fine(model, pixels)
        assert torch.equal(g, model.encode_image(pixels))
        # tokens: the final patch tokens (no CLS) through ln_post and proj
        v = model.visual
        x = v.transformer(v._embeds(pixels))
        assert torch.allclose(t, v.ln_post(x[:, 1:]) @ v.proj, atol=1e-6)
    tiny.model.train()


def test_vit_tokens_are_normed_when_ln_post_comes_after_pooling():
    model = open_clip.create_model(
        "otc-vit-tiny",
        vision_cfg={
            "image_size": 56,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "final_ln_after_pool": True,
            "pool_type": "avg",
        },
    ).eval()
    pixels = M.image_transform(_images(2), 56)
    with torch.no_grad():
        g, t = M.encode_image_fine(model, pixels)
        assert torch.allclose(g, model.encode_image(pixels), atol=1e-6)
        v = model.visual
        x = v.transformer(v._embeds(pixels))
        assert torch.allclose(t, v.ln_post(x[:, 1:]) @ v.proj, atol=1e-6)


def test_resnet_fine_tokens_are_the_attention_pool_values(rn):
    model = rn.model.eval()
    pixels = M.image_transform(_images(2), rn.image_size)
    with torch.no_grad():
        g, t = M.encode_image_fine(model, pixels)
        assert torch.equal(g, model.encode_image(pixels))
        assert t.shape == (2, 16, rn.embed_dim)
        # with all attention on one location, the pool would output exactly that token
        r = model.visual
        x = r.layer4(r.layer3(r.layer2(r.layer1(r.stem(pixels)))))
        cell = x[:, :, 1, 2] + r.attnpool.positional_embedding[1 + 4 * 1 + 2]
        assert torch.allclose(t[:, 6], r.attnpool.c_proj(r.attnpool.v_proj(cell)), atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        M.encode_image_fine(model, M.image_transform(_images(1), 64))


def _expected_mask(tokenizer, captions, length):
    masks = []
    for c in captions:
        n = min(len(tokenizer.encode(c)), length - 2)
        masks.append([False] + [True] * n + [False] * (length - 1 - n))
    return torch.tensor(masks)


def test_text_fine_global_tokens_and_mask_for_clip(tiny):
    model = tiny.model.eval()
    tokens = tiny.tokenizer(CAPTIONS)
    with torch.no_grad():
        g, t, m = M.encode_text_fine(model, tokens)
        assert torch.equal(g, model.encode_text(tokens))
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        assert torch.allclose(t, x @ model.text_projection, atol=1e-6)
    assert t.shape == (4, 32, tiny.embed_dim) and m.dtype == torch.bool
    assert torch.equal(m, _expected_mask(tiny.tokenizer, CAPTIONS, 32))
    sot, eot = tiny.tokenizer.sot_token_id, tiny.tokenizer.eot_token_id
    assert not m[tokens == sot].any() and not m[tokens == eot].any()
    assert m[1].sum() == 0  # the empty caption has no words
    assert m[2].sum() == 30  # truncated: all but SOT and EOT
    tiny.model.train()


def test_text_fine_for_custom_text_clip():
    model = open_clip.create_model("otc-vit-tiny", force_custom_text=True).eval()
    assert isinstance(model, open_clip.CustomTextCLIP)
    tok = open_clip.get_tokenizer("otc-vit-tiny")
    tokens = tok(CAPTIONS)
    with torch.no_grad():
        g, t, m = M.encode_text_fine(model, tokens)
        assert torch.equal(g, model.encode_text(tokens))
        assert t.shape == (4, 32, 64)
    assert torch.equal(m, _expected_mask(tok, CAPTIONS, 32))


def test_gradients_reach_the_towers_through_the_tokens(tiny):
    model = tiny.model.train()
    pixels = M.image_transform(_images(2), tiny.image_size)
    _, t = M.encode_image_fine(model, pixels)
    _, w, m = M.encode_text_fine(model, tiny.tokenizer(CAPTIONS[:2]))
    (t.sum() + w[m].sum()).backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_seed_fixes_the_initialisation_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = M.create_model("otc-vit-tiny", seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = M.create_model("otc-vit-tiny", seed=5)
    c = M.create_model("otc-vit-tiny", seed=6)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.proj"], sc["visual.proj"])


def test_unknown_or_downloading_models_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("otc-vit-huge")
    with pytest.raises(ValueError, match="no downloads"):
        M.create_model("hf-hub:laion/CLIP-ViT-B-32")
    with pytest.raises(ValueError, match="Hugging Face"):
        M.create_model("ViT-B-16-SigLIP")


def test_save_and_load_weights_round_trip(tmp_path):
    a = M.create_model("otc-vit-tiny", seed=1)
    path = tmp_path / "w" / "model.safetensors"
    M.save_weights(a, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.safetensors"]
    b = M.create_model("otc-vit-tiny", seed=2)
    M.load_weights(b, path)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = M.create_model("otc-vit-tiny", seed=3, weights=path)
    assert torch.equal(c.model.state_dict()["visual.proj"], sa["visual.proj"])


def test_loading_another_models_weights_is_a_clear_error(tmp_path, rn):
    path = tmp_path / "rn.safetensors"
    M.save_weights(rn, path)
    tiny = M.create_model("otc-vit-tiny", seed=4)
    before = tiny.model.state_dict()["visual.proj"].clone()
    with pytest.raises(ValueError, match="otc-rn-tiny"):
        M.load_weights(tiny, path)
    assert torch.equal(tiny.model.state_dict()["visual.proj"], before)
    with pytest.raises(FileNotFoundError):
        M.load_weights(tiny, tmp_path / "missing.safetensors")
    # a foreign file without our metadata: checked tensor by tensor
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit"):
        M.load_weights(tiny, tmp_path / "other.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        M.load_weights(tiny, tmp_path / "junk.safetensors")


def test_torch_state_dicts_load_too(tmp_path):
    a = M.create_model("otc-vit-tiny", seed=7)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in a.model.state_dict().items()}},
        tmp_path / "ckpt.pt",
    )
    b = M.create_model("otc-vit-tiny", seed=8, weights=tmp_path / "ckpt.pt")
    assert torch.equal(b.model.state_dict()["visual.proj"], a.model.state_dict()["visual.proj"])


def test_image_transform_grayscale_rgb_resize_and_normalisation():
    gray = _images(2, 28)
    out = M.image_transform(gray, 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    expect = torch.from_numpy(gray).float() / 255
    # normalised per channel with CLIP's mean and std, the gray value copied to each channel
    assert torch.allclose(out[:, 0], (expect - M._MEAN[0]) / M._STD[0], atol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 2])  # the channels' std differ
    for ch in range(3):
        assert torch.allclose(out[:, ch] * M._STD[ch] + M._MEAN[ch], expect, atol=1e-6)
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    out = M.image_transform(rgb, 28)
    assert torch.allclose(out[:, 2] * M._STD[2] + M._MEAN[2], 1 - expect, atol=1e-6)
    big = M.image_transform(torch.from_numpy(gray), 56)
    assert big.shape == (2, 3, 56, 56)
    flat = np.full((1, 40, 30), 200, np.uint8)  # non-square: centre crop, then resize
    out = M.image_transform(flat, 56)
    assert out.shape == (1, 3, 56, 56)
    assert torch.allclose(out[0, 0] * M._STD[0] + M._MEAN[0], torch.tensor(200 / 255), atol=1e-5)
    assert M.image_transform(gray[..., None], 28).shape == (2, 3, 28, 28)


@pytest.mark.parametrize(
    ("images", "error"),
    [
        (np.zeros((2, 8, 8), np.float32), TypeError),
        (np.zeros((8, 8, 3, 3, 1), np.uint8), ValueError),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError),
        ([[1, 2]], TypeError),
    ],
)
def test_image_transform_rejects_bad_input(images, error):
    with pytest.raises(error):
        M.image_transform(images, 28)


def test_embed_images_and_texts(tiny):
    images = _images(5, rgb=True)
    tiny.model.train()
    g = M.embed_images(tiny, images, batch_size=2)
    assert tiny.model.training and tiny.model.visual.transformer.training  # modes restored
    assert g.dtype == np.float32 and g.shape == (5, 64)
    assert np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    g2, tok = M.embed_images(tiny, images, batch_size=3, fine=True, progress=True)
    assert np.allclose(g, g2, atol=1e-6)
    assert tok.dtype == np.float16 and tok.shape == (5, 64, 64)
    assert np.allclose(np.linalg.norm(tok.astype(np.float32), axis=-1), 1, atol=2e-3)
    tiny.model.eval()
    with torch.no_grad():
        ref = M.encode_image_fine(tiny.model, M.image_transform(images, 56))
    tiny.model.train()
    ref_g = torch.nn.functional.normalize(ref[0], dim=-1).numpy()
    assert np.allclose(g, ref_g, atol=1e-5)

    h = M.embed_texts(tiny, CAPTIONS, batch_size=3)
    assert h.shape == (4, 64) and np.allclose(np.linalg.norm(h, axis=1), 1, atol=1e-5)
    h2, words, mask = M.embed_texts(tiny, CAPTIONS, fine=True)
    assert np.allclose(h, h2, atol=1e-6)
    assert words.dtype == np.float16 and words.shape == (4, 32, 64)
    assert mask.dtype == bool and mask.sum(1).tolist() == [9, 0, 30, 3]
    assert tiny.model.training
    with pytest.raises(TypeError):
        M.embed_texts(tiny, "one caption")
    with pytest.raises(ValueError):
        M.embed_images(tiny, images, batch_size=0)
