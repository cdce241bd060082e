"""common/scorers.py: each scorer loads from a local folder built from a tiny config and gives its formula's value,
computed here independently (transformers' own processor and CLIPModel forward, explicit matrix products);
gradients reach the pixels."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.scorers import AestheticMLP, ClipScore, RewardMLP, load_scorer, save_reward_model
from common.toy import PROMPTS, toy_reward

N = 5


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel (projection dim 16, 32 px) with the toy tokenizer; processor saved apart too."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.toy import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    ))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(42.0))  # not CLIP's init value, so a wrong scale would show
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    root = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    model.save_pretrained(root / "model_only")  # PickScore's layout: the processor comes from elsewhere
    return dict(clip=str(root / "clip"), model_only=str(root / "model_only"), model=model.eval(), processor=processor)


def _images(n=N, size=32, seed=0):
    """Images on the 8-bit grid, so transformers' PIL path sees exactly the pixels our torch path sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def _reference(tiny_clip, images, prompts):
    """transformers' own route: processor on PIL images -> CLIPModel forward. (logits_per_image diag, e_I, e_T)."""
    pils = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    inputs = tiny_clip["processor"](text=prompts, images=pils, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = tiny_clip["model"](**inputs)
    return out.logits_per_image.diag(), out.image_embeds, out.text_embeds  # embeds: unit-normalised


def test_clip_score_equals_formula(tiny_clip):
    images, prompts = _images(), PROMPTS[:N]
    logits, e_i, e_t = _reference(tiny_clip, images, prompts)
    cos = (e_i * e_t).sum(-1)
    scorer = load_scorer("clip", tiny_clip["clip"])
    with torch.no_grad():
        got = scorer(images, prompts)
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, 100 * (logits / 42.0).clamp(min=0), atol=1e-4, rtol=1e-4)


def test_clip_score_clamps_negative_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(ClipScore.score(None, a, b), torch.tensor([0.0, 100 / 2**0.5]))


def test_pickscore_equals_formula_with_processor_from_elsewhere(tiny_clip):
    images, prompts = _images(seed=1), PROMPTS[3 : 3 + N]
    logits, e_i, e_t = _reference(tiny_clip, images, prompts)
    scorer = load_scorer("pickscore", tiny_clip["model_only"], clip_path=tiny_clip["clip"], batch_size=2)
    with torch.no_grad():
        got = scorer(images, prompts)
    torch.testing.assert_close(got, 42.0 * (e_i * e_t).sum(-1), atol=1e-4, rtol=1e-4)  # exp(logit_scale) · cos
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_equals_formula(tiny_clip, tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    head = AestheticMLP(16)  # the toy backbone's projection dim; 768 for ViT-L/14
    state = head.state_dict()
    assert sorted({k.split(".")[1] for k in state}) == ["0", "2", "4", "6", "7"]  # the released file's key names
    path = tmp_path / f"head{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    images, prompts = _images(seed=2), PROMPTS[:N]
    _, e_i, _ = _reference(tiny_clip, images, prompts)  # unit-normalised, as the LAION predictor feeds its head
    x = e_i
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations; dropout is the identity in eval mode
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    scorer = load_scorer("aesthetic", str(path), clip_path=tiny_clip["clip"])
    with torch.no_grad():
        got = scorer(images, prompts)
    torch.testing.assert_close(got, x.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_aesthetic_rejects_mismatched_backbone(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    save_file(AestheticMLP(768).state_dict(), str(tmp_path / "l14.safetensors"))
    with pytest.raises(ValueError, match="768"):
        load_scorer("aesthetic", str(tmp_path / "l14.safetensors"), clip_path=tiny_clip["clip"])


def test_reward_model_equals_formula(tiny_clip, tmp_path):
    torch.manual_seed(2)
    head = RewardMLP(16, hidden_dim=24, num_hidden_layers=3)
    save_reward_model(tmp_path / "rm", head, dict(clip=tiny_clip["clip"], embed_dim=16, hidden_dim=24,
                                                  num_hidden_layers=3))
    images, prompts = _images(seed=3), PROMPTS[5 : 5 + N]
    _, e_i, e_t = _reference(tiny_clip, images, prompts)
    state = head.state_dict()
    x = torch.cat([e_i, e_t], -1)  # [e_I/|e_I|, e_T/|e_T|]
    for i in (0, 2, 4):
        x = F.leaky_relu(x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"], 0.01)
    expected = (x @ state["layers.6.weight"].T + state["layers.6.bias"]).squeeze(-1)
    scorer = load_scorer("reward-model", str(tmp_path / "rm"), batch_size=3)
    with torch.no_grad():
        got = scorer(images, prompts)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_toy_scorer_is_toy_reward():
    images, prompts = _images(seed=4), PROMPTS[:N]
    torch.testing.assert_close(load_scorer("toy")(images, prompts), toy_reward(images, prompts))


@pytest.mark.parametrize("name", ["toy", "clip", "pickscore", "aesthetic", "reward-model"])
def test_gradients_reach_pixels_through_resize(tiny_clip, tmp_path, name):
    from safetensors.torch import save_file

    path = {"clip": tiny_clip["clip"], "pickscore": tiny_clip["clip"]}.get(name)
    if name == "aesthetic":
        path = str(tmp_path / "a.safetensors")
        save_file(AestheticMLP(16).state_dict(), path)
    if name == "reward-model":
        path = str(tmp_path / "rm")
        save_reward_model(path, RewardMLP(16), dict(clip=tiny_clip["clip"], embed_dim=16, hidden_dim=512,
                                                    num_hidden_layers=3))
    scorer = load_scorer(name, path, clip_path=tiny_clip["clip"] if name != "reward-model" else None, batch_size=2)
    assert not any(p.requires_grad for p in scorer.parameters()) and not scorer.training
    # Not the model's size, so the torch resize and crop run; values chosen where every tiny-CLIP cosine is
    # positive (the CLIP score's max(cos, 0) has no gradient below 0).
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scores = scorer(images, PROMPTS[:3])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad.flatten(1).abs().sum(1) > 0).all()
    # Each image's gradient comes from its own score only.
    images.grad = None
    scorer(images, PROMPTS[:3])[1].backward()
    assert images.grad[0].abs().sum() == 0 and images.grad[2].abs().sum() == 0 and images.grad[1].abs().sum() > 0


def test_resize_matches_transformers_processor(tiny_clip):
    from common.scorers import ClipBackbone

    backbone = ClipBackbone(tiny_clip["clip"])
    processor = tiny_clip["processor"].image_processor
    # float input in [0.25, 0.75], where bicubic's overshoot cannot reach the clamps: the processor's tensor path
    images = 0.25 + 0.5 * torch.rand(2, 3, 48, 64)
    expected = processor(images=images, do_rescale=False, return_tensors="pt").pixel_values
    torch.testing.assert_close(backbone.pixels(images), expected, atol=1e-4, rtol=1e-4)
    # an 8-bit PIL image with hard edges (how the PickScore and aesthetic code call the processor): within 1/255
    x = _sharp_8bit(45, 73, seed=6)
    pil = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    mean, std = backbone.mean.view(3, 1, 1), backbone.std.view(3, 1, 1)
    expected = processor(images=pil, return_tensors="pt").pixel_values[0] * std + mean
    assert (backbone.pixels(x[None])[0] * std + mean - expected).abs().max() <= 1 / 255


# ------------------------------------------------------------------------------------------------ CLIP score forms


def test_clip_score_forms_differ_as_documented():
    """Ours clamps each image then averages (Hessel et al.); torchmetrics clamps the mean of the raw 100·cos."""
    from common.scorers import ClipScoreRaw, torchmetrics_clip_score

    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[-1.0, 0.2], [1.0, 1.0], [0.0, 1.0]])
    cos = F.cosine_similarity(a, b)  # (-0.98, 0.71, 0.0)
    raw = ClipScoreRaw.score(None, a, b)
    torch.testing.assert_close(raw, 100 * cos)
    ours = ClipScore.score(None, a, b).mean()
    torch.testing.assert_close(ours, (100 * cos).clamp(min=0).mean())
    torch.testing.assert_close(torchmetrics_clip_score(raw), (100 * cos).mean().clamp(min=0))
    assert torchmetrics_clip_score(raw) == 0 and ours > 23  # the forms differ once an image has cos < 0


def test_clip_raw_scorer_loads_and_equals_unclamped_formula(tiny_clip):
    images, prompts = _images(seed=7), PROMPTS[:N]
    _, e_i, e_t = _reference(tiny_clip, images, prompts)
    with torch.no_grad():
        got = load_scorer("clip-raw", tiny_clip["clip"])(images, prompts)
    torch.testing.assert_close(got, 100 * (e_i * e_t).sum(-1), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ DPOK's reward head


def test_dpok_head_is_sigmoid_on_raw_text_then_image():
    """head='dpok' = dpok/reward_model.py's RewardModel(activation='sig'): σ(MLP(cat[text, image])) on raw
    embeddings; head='mlp' (ours) = MLP(cat[image/|image|, text/|text|]). Same weights, different values."""
    torch.manual_seed(3)
    dpok = RewardMLP(6, hidden_dim=8, num_hidden_layers=3, head="dpok")
    ours = RewardMLP(6, hidden_dim=8, num_hidden_layers=3, head="mlp")
    ours.load_state_dict(dpok.state_dict())
    e_i, e_t = 3 * torch.randn(5, 6), 3 * torch.randn(5, 6)
    state = dpok.state_dict()

    def mlp(x):
        for i in (0, 2, 4):
            x = F.leaky_relu(x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"], 0.01)
        return (x @ state["layers.6.weight"].T + state["layers.6.bias"]).squeeze(-1)

    torch.testing.assert_close(dpok(e_i, e_t), torch.sigmoid(mlp(torch.cat([e_t, e_i], -1))))
    torch.testing.assert_close(ours(e_i, e_t), mlp(torch.cat([F.normalize(e_i, dim=-1), F.normalize(e_t, dim=-1)], -1)))
    assert ((dpok(e_i, e_t) > 0) & (dpok(e_i, e_t) < 1)).all()
    assert (dpok(e_i, e_t) - ours(e_i, e_t)).abs().max() > 1e-3


def test_reward_model_folder_keeps_its_head(tiny_clip, tmp_path):
    from common.scorers import load_reward_model

    torch.manual_seed(4)
    head = RewardMLP(16, hidden_dim=24, num_hidden_layers=3, head="dpok")
    save_reward_model(tmp_path / "rm", head, dict(clip=tiny_clip["clip"], embed_dim=16, hidden_dim=24,
                                                  num_hidden_layers=3))
    loaded, config = load_reward_model(tmp_path / "rm")
    assert config["head"] == "dpok" and loaded.head == "dpok"
    images, prompts = _images(seed=5), PROMPTS[:N]
    _, e_i, e_t = _reference(tiny_clip, images, prompts)  # unit-normalised: rescale to show raw inputs are used
    with torch.no_grad():
        got = load_scorer("reward-model", str(tmp_path / "rm"))(images, prompts)
    backbone = load_scorer("clip", tiny_clip["clip"]).backbone
    with torch.no_grad():
        raw_i, raw_t = backbone.embed_images(images), backbone.embed_texts(prompts)
        torch.testing.assert_close(got, head(raw_i, raw_t), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, head(e_i, e_t), atol=1e-4)  # raw norms matter to DPOK's head


# ------------------------------------------------------------------------------------------------ HPS v2.1


def openclip_layout(width=32, layers=2, patch=8, image=32, t_width=32, t_layers=2, vocab=None, context=77, embed=16):
    """Random tensors under the keys and shapes OpenCLIP's `CLIP` (open_clip/model.py, transformer.py; HPS v2's
    ViT-H-14 with no layer scale, no attentional pool) puts in its state dict: OpenAI CLIP's layout."""
    g = torch.Generator().manual_seed(11)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    state = {"visual.class_embedding": r(width), "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
             "visual.proj": r(width, embed), "visual.conv1.weight": r(width, 3, patch, patch),
             "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
             "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
             "token_embedding.weight": r(vocab, t_width), "positional_embedding": r(context, t_width),
             "ln_final.weight": 1 + r(t_width), "ln_final.bias": r(t_width), "text_projection": r(t_width, embed),
             "logit_scale": torch.tensor(4.6052)}
    for prefix, w, n in (("visual.transformer", width, layers), ("transformer", t_width, t_layers)):
        for i in range(n):
            b = f"{prefix}.resblocks.{i}."
            state |= {b + "ln_1.weight": 1 + r(w), b + "ln_1.bias": r(w), b + "attn.in_proj_weight": r(3 * w, w),
                      b + "attn.in_proj_bias": r(3 * w), b + "attn.out_proj.weight": r(w, w),
                      b + "attn.out_proj.bias": r(w), b + "ln_2.weight": 1 + r(w), b + "ln_2.bias": r(w),
                      b + "mlp.c_fc.weight": r(4 * w, w), b + "mlp.c_fc.bias": r(4 * w),
                      b + "mlp.c_proj.weight": r(w, 4 * w), b + "mlp.c_proj.bias": r(w)}
    return state


def openclip_forward(state, pixels, ids, eos_pos, v_heads, t_heads):
    """OpenCLIP's encode_image / encode_text written out on the state dict (torch's multi-head attention, as
    OpenCLIP's nn.MultiheadAttention; GELU; LayerNorm ε 1e-5). Returns unit-normalised (e_I, e_T)."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + ".weight"], state[p + ".bias"], 1e-5)  # noqa: E731

    def blocks(x, prefix, heads, mask):
        i = 0
        while f"{prefix}.resblocks.{i}.ln_1.weight" in state:
            b = f"{prefix}.resblocks.{i}."
            h = ln(x, b + "ln_1").transpose(0, 1)  # (L, N, D)
            a, _ = F.multi_head_attention_forward(
                h, h, h, h.shape[-1], heads, state[b + "attn.in_proj_weight"], state[b + "attn.in_proj_bias"],
                None, None, False, 0.0, state[b + "attn.out_proj.weight"], state[b + "attn.out_proj.bias"],
                need_weights=False, attn_mask=mask)
            x = x + a.transpose(0, 1)
            h = F.gelu(ln(x, b + "ln_2") @ state[b + "mlp.c_fc.weight"].T + state[b + "mlp.c_fc.bias"])
            x = x + h @ state[b + "mlp.c_proj.weight"].T + state[b + "mlp.c_proj.bias"]
            i += 1
        return x

    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=state["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (N, P, D)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + state["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre"), "visual.transformer", v_heads, None)
    e_i = ln(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = ln(blocks(t, "transformer", t_heads, causal), "ln_final")
    e_t = t[torch.arange(len(ids)), eos_pos] @ state["text_projection"]  # OpenCLIP: argmax(ids) = the EOT token
    return F.normalize(e_i, dim=-1), F.normalize(e_t, dim=-1)


def test_hps_maps_every_openclip_key_and_equals_openclip_forward(tiny_clip, tmp_path):
    from common.scorers import openclip_to_transformers

    tok = tiny_clip["processor"].tokenizer
    state = openclip_layout(vocab=len(tok))
    folder = tmp_path / "hps"
    folder.mkdir()
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, folder / "HPS_v2.1_compressed.pt")
    state = {k: v.half().float() for k, v in state.items()}  # what the fp16 "compressed" file holds
    model_cfg = {"embed_dim": 16, "vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    config, new = openclip_to_transformers(state, model_cfg, tok.eos_token_id)
    from transformers import CLIPModel

    assert set(new) == set(CLIPModel(config).state_dict())  # every CLIPModel tensor, from exactly the file's keys
    assert config.vision_config.num_attention_heads == 2 and config.text_config.num_attention_heads == 4
    with pytest.raises(ValueError, match="no place"):
        openclip_to_transformers({**state, "visual.attn_pool.query": torch.zeros(1)}, model_cfg, tok.eos_token_id)

    images, prompts = _images(seed=8), PROMPTS[2 : 2 + N]
    pils = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    inputs = tiny_clip["processor"](text=prompts, images=pils, padding="max_length", return_tensors="pt")
    eos_pos = (inputs.input_ids == tok.eos_token_id).int().argmax(-1)
    e_i, e_t = openclip_forward(state, inputs.pixel_values, inputs.input_ids, eos_pos, 2, 4)
    scorer = load_scorer("hps", str(folder), clip_path=tiny_clip["clip"], batch_size=2)
    with torch.no_grad():
        got = scorer(images, prompts)
    torch.testing.assert_close(got, 100 * (e_i * e_t).sum(-1), atol=1e-3, rtol=1e-3)
    assert got.std() > 1  # not a constant


# ------------------------------------------------------------------------------------------------ ImageReward


BLIP_TINY = dict(width=128, depth=2, patch=8, image=32, hidden=32, layers=2, heads=2, inter=64, max_pos=40)


def tiny_bert_tokenizer(folder):
    """A BERT WordPiece tokenizer over the toy words (the files bert-base-uncased ships, in miniature)."""
    from transformers import BertTokenizer

    words = sorted({w for p in PROMPTS for w in p.split()} | {"long", "very"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return len(vocab) + 2  # + BLIP's [DEC] and [ENC]


def imagereward_layout(vocab, width, depth, patch, image, hidden, layers, heads, inter, max_pos, **_):
    """Random tensors under the keys and shapes ImageReward.pt holds: `ImageReward.state_dict()` =
    blip.visual_encoder (BLIP's vit.py VisionTransformer), blip.text_encoder (med.py BertModel,
    add_pooling_layer=False, with its persistent position_ids buffer), blip.vision_proj / text_proj (256-dim),
    mlp.layers.{0,2,4,6,7} (ImageReward.py's MLP(768))."""
    g = torch.Generator().manual_seed(12)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "cls_token": r(1, 1, width), v + "pos_embed": r(1, (image // patch) ** 2 + 1, width),
         v + "patch_embed.proj.weight": r(width, 3, patch, patch), v + "patch_embed.proj.bias": r(width),
         v + "norm.weight": 1 + r(width), v + "norm.bias": r(width)}
    for i in range(depth):
        b = f"{v}blocks.{i}."
        s |= {b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width), b + "attn.qkv.weight": r(3 * width, width),
              b + "attn.qkv.bias": r(3 * width), b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
              b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width), b + "mlp.fc1.weight": r(4 * width, width),
              b + "mlp.fc1.bias": r(4 * width), b + "mlp.fc2.weight": r(width, 4 * width), b + "mlp.fc2.bias": r(width)}
    s |= {t + "embeddings.position_ids": torch.arange(max_pos)[None], t + "embeddings.word_embeddings.weight":
          r(vocab, hidden), t + "embeddings.position_embeddings.weight": r(max_pos, hidden),
          t + "embeddings.LayerNorm.weight": 1 + r(hidden), t + "embeddings.LayerNorm.bias": r(hidden)}
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", hidden), ("crossattention", width)):
            s |= {f"{b}{att}.self.query.weight": r(hidden, hidden), f"{b}{att}.self.query.bias": r(hidden),
                  f"{b}{att}.self.key.weight": r(hidden, kv), f"{b}{att}.self.key.bias": r(hidden),
                  f"{b}{att}.self.value.weight": r(hidden, kv), f"{b}{att}.self.value.bias": r(hidden),
                  f"{b}{att}.output.dense.weight": r(hidden, hidden), f"{b}{att}.output.dense.bias": r(hidden),
                  f"{b}{att}.output.LayerNorm.weight": 1 + r(hidden), f"{b}{att}.output.LayerNorm.bias": r(hidden)}
        s |= {b + "intermediate.dense.weight": r(inter, hidden), b + "intermediate.dense.bias": r(inter),
              b + "output.dense.weight": r(hidden, inter), b + "output.dense.bias": r(hidden),
              b + "output.LayerNorm.weight": 1 + r(hidden), b + "output.LayerNorm.bias": r(hidden)}
    s |= {"blip.vision_proj.weight": r(256, width), "blip.vision_proj.bias": r(256),
          "blip.text_proj.weight": r(256, hidden), "blip.text_proj.bias": r(256)}
    for i, (d_in, d_out) in zip((0, 2, 4, 6, 7), ((hidden, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        s |= {f"mlp.layers.{i}.weight": r(d_out, d_in), f"mlp.layers.{i}.bias": r(d_out)}
    return s


def imagereward_forward(s, pixels, ids, mask, v_heads, t_heads):
    """ImageReward's score written out on its own keys: BLIP's ViT (pre-LN blocks, LayerNorm ε 1e-6), BLIP's BERT
    (post-LN, self- then cross-attention, ε 1e-12) on [CLS], the MLP, then (r - μ) / σ."""

    def attn(xq, xkv, wq, bq, wk, bk, wv, bv, heads, key_mask=None):
        (n, lq, d), lk = xq.shape, xkv.shape[1]
        q = (xq @ wq.T + bq).view(n, lq, heads, -1).transpose(1, 2)
        k = (xkv @ wk.T + bk).view(n, lk, heads, -1).transpose(1, 2)
        v = (xkv @ wv.T + bv).view(n, lk, heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, d)

    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)  # noqa: E731
    lin = lambda x, p: x @ s[p + ".weight"].T + s[p + ".bias"]  # noqa: E731
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"],
                 stride=s[v + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x], 1) + s[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in s:
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        wq, wk, wv = s[b + "attn.qkv.weight"].chunk(3)
        bq, bk, bv = s[b + "attn.qkv.bias"].chunk(3)
        x = x + lin(attn(h, h, wq, bq, wk, bk, wv, bv, v_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    image_embeds = ln(x, v + "norm", 1e-6)  # all tokens
    t = "blip.text_encoder."
    h = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    i = 0
    while f"{t}encoder.layer.{i}.intermediate.dense.weight" in s:
        b = f"{t}encoder.layer.{i}."
        for att, kv, m in (("attention", None, mask), ("crossattention", image_embeds, None)):
            p = f"{b}{att}.self."
            a = attn(h, h if kv is None else kv, s[p + "query.weight"], s[p + "query.bias"], s[p + "key.weight"],
                     s[p + "key.bias"], s[p + "value.weight"], s[p + "value.bias"], t_heads, m)
            h = ln(lin(a, f"{b}{att}.output.dense") + h, f"{b}{att}.output.LayerNorm", 1e-12)
        f = lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense")
        h = ln(f + h, b + "output.LayerNorm", 1e-12)
        i += 1
    r = h[:, 0]
    for k in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{k}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """ImageReward.pt + med_config.json (tiny, original layout) and a BERT tokenizer folder."""
    root = tmp_path_factory.mktemp("imagereward")
    (root / "tok").mkdir()
    vocab = tiny_bert_tokenizer(root / "tok")
    state = imagereward_layout(vocab, **BLIP_TINY)
    (root / "ir").mkdir()
    torch.save(state, root / "ir" / "ImageReward.pt")
    (root / "ir" / "med_config.json").write_text(json.dumps(dict(
        architectures=["BertModel"], hidden_size=BLIP_TINY["hidden"], num_hidden_layers=BLIP_TINY["layers"],
        num_attention_heads=BLIP_TINY["heads"], intermediate_size=BLIP_TINY["inter"], vocab_size=vocab,
        max_position_embeddings=BLIP_TINY["max_pos"], layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
        type_vocab_size=2, encoder_width=BLIP_TINY["width"], add_cross_attention=True)))
    return dict(folder=str(root / "ir"), tokenizer=str(root / "tok"), state=state)


def test_imagereward_maps_every_key(tiny_imagereward):
    from common.scorers import ImageRewardModel, imagereward_to_transformers

    state = tiny_imagereward["state"]
    new = imagereward_to_transformers(state)
    model = ImageRewardModel(new, {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 64, "vocab_size": state[
                                       "blip.text_encoder.embeddings.word_embeddings.weight"].shape[0],
                                   "max_position_embeddings": 40})
    assert set(new) == set(model.state_dict())  # no missing, no unexpected
    dropped = set(state) - {k for k in state if not k.startswith(("blip.vision_proj", "blip.text_proj"))
                            and not k.endswith("position_ids")}
    assert len(new) == len(state) - len(dropped) and dropped == {
        "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"} | {
        "blip.text_encoder.embeddings.position_ids"}
    with pytest.raises(ValueError, match="no place"):
        imagereward_to_transformers({**state, "blip.itm_head.weight": torch.zeros(2, 32)})


def test_imagereward_equals_independent_computation(tiny_imagereward):
    from transformers import AutoTokenizer

    long = "a very long " * 12 + "red circle"  # 38 words: truncation at 35 tokens matters
    prompts = [PROMPTS[0], PROMPTS[7], long, PROMPTS[3], PROMPTS[11]]
    images = _images(seed=9)  # at the model's 32 px: no resize, so the pixels are the reference's exactly
    tok = AutoTokenizer.from_pretrained(tiny_imagereward["tokenizer"])
    tokens = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (5, 35) and (tokens.input_ids[:, 0] == tok.cls_token_id).all()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # ImageReward's Normalize(...)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = imagereward_forward(tiny_imagereward["state"], (images - mean) / std, tokens.input_ids,
                                   tokens.attention_mask, v_heads=128 // 64, t_heads=2)
    scorer = load_scorer("imagereward", tiny_imagereward["folder"], clip_path=tiny_imagereward["tokenizer"],
                         batch_size=2)
    with torch.no_grad():
        got = scorer(images, prompts)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.std() > 1e-3


def test_imagereward_preprocessing_matches_its_transform(tiny_imagereward):
    """Resize(short side, bicubic) + CenterCrop + Normalize(CLIP's constants), as ImageReward's _transform on a
    tensor; the constants are the original's."""
    import torchvision.transforms as T

    from common import scorers

    assert scorers.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert scorers.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (scorers.IMAGEREWARD_MEAN, scorers.IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                           T.Normalize(scorers.CLIP_MEAN, scorers.CLIP_STD)])
    # in [0.25, 0.75], where bicubic's overshoot cannot reach the clamps (the 8-bit PIL path: the test below)
    images = 0.25 + 0.5 * torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    got = scorers.clip_pixels(images, {"shortest_edge": 32}, (32, 32), torch.tensor(scorers.CLIP_MEAN),
                              torch.tensor(scorers.CLIP_STD), round_crop=True)
    torch.testing.assert_close(got, transform(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["imagereward", "hps"])
def test_new_scorers_are_differentiable_per_image(tiny_clip, tiny_imagereward, tmp_path, name):
    if name == "hps":
        path, clip_path = str(tmp_path / "HPS_v2.1_compressed.pt"), tiny_clip["clip"]
        torch.save({"state_dict": openclip_layout(vocab=len(tiny_clip["processor"].tokenizer))}, path)
        (tmp_path / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": {"vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}}))
    else:
        path, clip_path = tiny_imagereward["folder"], tiny_imagereward["tokenizer"]
    scorer = load_scorer(name, path, clip_path=clip_path, batch_size=2)
    assert not any(p.requires_grad for p in scorer.parameters()) and not scorer.training
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scorer(images, PROMPTS[:3])[1].backward()
    assert images.grad[0].abs().sum() == 0 and images.grad[2].abs().sum() == 0 and images.grad[1].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ preprocessing, as the
# official pipelines run it on images that are neither square nor at the model's size


def _sharp_8bit(h, w, seed):
    """(3, h, w) on the 8-bit grid: noise with a white and a black block, whose hard edges make bicubic overshoot."""
    x = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float()
    x[:, h // 5 : h // 2, w // 6 : w // 2] = 255.0
    x[:, h // 2 : 4 * h // 5, w // 3 : 5 * w // 6] = 0.0
    return x / 255


@pytest.mark.parametrize("shape", [(300, 181), (181, 300)])
def test_hps_preprocessing_resizes_the_long_side_and_pads_with_black(shape):
    """HPS v2's ResizeMaxSize(224, fill=0) + Normalize, written out here with PIL and numpy: each float channel
    resized by PIL (mode F, bicubic: the antialiased kernel of torchvision's tensor resize), zero-padded, normalised;
    and with torchvision's functions in open_clip's order (the official code path)."""
    import torchvision.transforms.functional as TF

    from common.scorers import CLIP_MEAN, CLIP_STD, hps_pixels

    x = _sharp_8bit(*shape, seed=0)
    got = hps_pixels(x[None].double(), 224, torch.tensor(CLIP_MEAN).double(), torch.tensor(CLIP_STD).double())[0]
    assert got.shape == (3, 224, 224)
    h, w = (224, round(181 * 224 / 300)) if shape[0] == 300 else (round(181 * 224 / 300), 224)  # 135 on the short side
    resized = np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BICUBIC), dtype=np.float64)
                        for c in x.numpy()])
    top, left = (224 - h) // 2, (224 - w) // 2  # 44 and 45 of an 89-pixel pad: the extra row/column at the end
    padded = np.zeros((3, 224, 224))
    padded[:, top : top + h, left : left + w] = resized
    expected = (padded - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)
    official = TF.normalize(TF.pad(TF.resize(x, [h, w], TF.InterpolationMode.BICUBIC, antialias=True),
                                   [left, top, 224 - w - left, 224 - h - top], fill=0), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(got.float(), official, atol=1e-4, rtol=0)  # torchvision in float32
    assert resized.min() < -0.01 and resized.max() > 1.01  # overshoot kept: the official resize is on floats


@pytest.fixture(scope="module")
def tiny_hps(tiny_clip, tmp_path_factory):
    """HPS_v2.1_compressed.pt and (v2.0) HPS_v2_compressed.pt, OpenCLIP layout, float32, with open_clip_config.json."""
    folder = tmp_path_factory.mktemp("hps")
    state = openclip_layout(vocab=len(tiny_clip["processor"].tokenizer))
    torch.save({"state_dict": state}, folder / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": {k: v + 0.5 if k == "visual.ln_post.bias" else v for k, v in state.items()}},
               folder / "HPS_v2_compressed.pt")  # another model
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}}))
    return dict(folder=str(folder), state=state)


def test_hps_scores_a_non_square_image_padded_not_cropped(tiny_clip, tiny_hps):
    """The score of a 40 x 64 image is OpenCLIP's forward on the whole image resized to 20 x 32 and padded to 32 x 32;
    the right half of the image matters (a centre crop would cut its edges away)."""
    import torchvision.transforms.functional as TF

    from common.scorers import CLIP_MEAN, CLIP_STD

    tok = tiny_clip["processor"].tokenizer
    images = torch.stack([_sharp_8bit(40, 64, seed=s) for s in (1, 2)])
    prompts = PROMPTS[4:6]
    pixels = TF.normalize(TF.pad(TF.resize(images, [20, 32], TF.InterpolationMode.BICUBIC, antialias=True),
                                 [0, 6, 0, 6], fill=0), CLIP_MEAN, CLIP_STD)
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    e_i, e_t = openclip_forward(tiny_hps["state"], pixels, ids, (ids == tok.eos_token_id).int().argmax(-1), 2, 4)
    scorer = load_scorer("hps", tiny_hps["folder"], clip_path=tiny_clip["clip"])
    with torch.no_grad():
        got = scorer(images, prompts)
        edited = images.clone()
        edited[..., -4:] = 1 - edited[..., -4:]  # the last 4 columns, which a short-side centre crop drops
        assert (scorer(edited, prompts) - got).abs().min() > 1e-4
    torch.testing.assert_close(got, 100 * (e_i * e_t).sum(-1), atol=1e-3, rtol=1e-3)


def test_imagereward_resize_is_pil_on_8_bits_within_1_over_255(tiny_imagereward):
    """ImageReward's _transform on a PIL image (torchvision Resize(32, bicubic) and CenterCrop(32) on 8 bits,
    ToTensor) against ours on the same pixels as floats: a 45 x 73 image with hard edges. Within 1/255 per pixel (PIL
    rounds each of its two passes to 8 bits; we do not, to keep a gradient); without the clamps, far off."""
    import torchvision.transforms as T

    from common.scorers import clip_pixels, pil_bicubic

    x = _sharp_8bit(45, 73, seed=3)
    pil = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    official = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                          T.ToTensor()])(pil)  # (3, 32, 32); the resize gives 32 x 51, the crop starts at round(9.5)
    got = clip_pixels(x[None], {"shortest_edge": 32}, (32, 32), torch.zeros(3), torch.ones(3), round_crop=True)[0]
    assert (got - official).abs().max() <= 1 / 255
    one_pass = F.interpolate(x[None], size=(32, 51), mode="bicubic", antialias=True)[0, :, :, 10:42]
    assert (one_pass - official).abs().max() > 10 / 255  # the old path: bicubic's overshoot left in
    assert (pil_bicubic(x[None], (32, 51))[0, :, :, 9:41] - official).abs().max() > 10 / 255  # a floor crop: 1 px off
    # the score: our ImageReward on the float image vs the reference forward on the official 8-bit pixels
    from transformers import AutoTokenizer

    from common.scorers import CLIP_MEAN, CLIP_STD

    tok = AutoTokenizer.from_pretrained(tiny_imagereward["tokenizer"])
    prompts = PROMPTS[:1]
    tokens = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = imagereward_forward(tiny_imagereward["state"], T.Normalize(CLIP_MEAN, CLIP_STD)(official)[None],
                                   tokens.input_ids, tokens.attention_mask, v_heads=2, t_heads=2)
    scorer = load_scorer("imagereward", tiny_imagereward["folder"], clip_path=tiny_imagereward["tokenizer"])
    with torch.no_grad():
        got = scorer(x[None], prompts)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ reward backpropagation


@pytest.fixture(scope="module")
def scorer_paths(tiny_clip, tiny_imagereward, tiny_hps, tmp_path_factory):
    """name -> (path, clip_path) of every tiny scorer, heads with random weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(5)
    save_file(AestheticMLP(16).state_dict(), str(root / "aesthetic.safetensors"))
    save_reward_model(root / "rm", RewardMLP(16, hidden_dim=24), dict(clip=tiny_clip["clip"], embed_dim=16,
                                                                      hidden_dim=24, num_hidden_layers=3))
    return {"clip": (tiny_clip["clip"], None), "clip-raw": (tiny_clip["clip"], None),
            "pickscore": (tiny_clip["model_only"], tiny_clip["clip"]), "hps": (tiny_hps["folder"], tiny_clip["clip"]),
            "imagereward": (tiny_imagereward["folder"], tiny_imagereward["tokenizer"]),
            "aesthetic": (str(root / "aesthetic.safetensors"), tiny_clip["clip"]), "reward-model": (str(root / "rm"), None)}


@pytest.mark.parametrize("name", ["clip", "clip-raw", "pickscore", "hps", "imagereward", "aesthetic", "reward-model"])
def test_reward_gradient_equals_finite_differences_and_the_score_the_no_grad_path(scorer_paths, name):
    """float64 scorer, two 40 x 56 images (resized, cropped or padded on the way): the gradient of
    w_1 r(x_1) + w_2 r(x_2) along random directions v equals the central difference (f(x + hv) - f(x - hv)) / 2h;
    and the differentiable score equals the evaluation call's, in float64 and in float32 as the scripts load it."""
    from common.scorers import DIFFERENTIABLE, differentiable_score

    assert name in DIFFERENTIABLE
    path, clip_path = scorer_paths[name]
    prompts = PROMPTS[:2]
    # float32 draws as test_gradients_reach_pixels_through_resize: every tiny-CLIP cosine positive (clip's clamp)
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))[:2].double()
    scorer = load_scorer(name, path, clip_path=clip_path, dtype=torch.float64, batch_size=1)
    x = images.clone().requires_grad_()
    r = differentiable_score(scorer, x, prompts)
    assert r.dtype == torch.float64 and r.shape == (2,) and r.grad_fn is not None
    w = torch.tensor([1.0, -0.7], dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * r).sum(), x)
    with torch.no_grad():
        torch.testing.assert_close(r.detach(), scorer(images, prompts), rtol=1e-12, atol=1e-12)
        f = lambda y: (w * scorer(y, prompts)).sum()  # noqa: E731
        g, h = torch.Generator().manual_seed(1), 1e-6
        for _ in range(3):
            v = torch.randn(images.shape, generator=g, dtype=torch.float64)
            fd = (f(images + h * v) - f(images - h * v)) / (2 * h)
            torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-5, atol=1e-7)
            assert fd.abs() > 1e-4  # a real slope, not two zeros agreeing
    if name == "clip":
        assert (r > 0).all()  # max(cos, 0) is flat below 0: the check needs the positive side
    scorer32 = load_scorer(name, path, clip_path=clip_path, batch_size=1)
    with torch.no_grad():
        plain = scorer32(images.float(), prompts)
    assert torch.equal(differentiable_score(scorer32, images.float().requires_grad_(), prompts).detach(), plain)


def test_toy_reward_gradient_is_its_formula():
    """d r / d x_p = -exp(-|x_p - c|² / 2τ²) (x_p - c) / (τ² H W), τ = 0.2, for the toy scorer (common/toy.py)."""
    from common.scorers import differentiable_score
    from common.toy import COLORS, parse_prompt

    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(2)).requires_grad_()
    prompts = PROMPTS[:2]
    (grad,) = torch.autograd.grad(differentiable_score(load_scorer("toy"), x, prompts).sum(), x)
    c = torch.tensor([COLORS[parse_prompt(p)[0]] for p in prompts], dtype=torch.float32)[:, :, None, None] / 255
    d = x.detach() - c
    expected = -torch.exp(-d.pow(2).sum(1, keepdim=True) / (2 * 0.2**2)) * d / (0.2**2 * 8 * 12)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


def test_differentiable_score_keeps_the_graph_under_no_grad_and_refuses_detached_images(tiny_clip):
    from common.scorers import differentiable_score

    scorer = load_scorer("clip-raw", tiny_clip["clip"])
    x = _images(n=2).requires_grad_()
    with torch.no_grad():  # a caller's leftover no_grad does not cut the graph silently
        r = differentiable_score(scorer, x, PROMPTS[:2])
    r.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in scorer.parameters())  # weights stay frozen
    with pytest.raises(ValueError, match="do not require grad"):
        differentiable_score(scorer, _images(n=2), PROMPTS[:2])


def test_feedback_defaults_are_diffusion_dpos_choice_models(tiny_clip, tiny_hps):
    """feedback=True: clip = 100 · cos, unclamped, on HPS's padded pixels (Diffusion-DPO's clip_utils: OpenCLIP's
    ViT-H/14 with light_augmentation); hps = the v2.0 file."""
    from common.scorers import CLIP_MEAN, CLIP_STD, hps_pixels

    images, prompts = torch.stack([_sharp_8bit(40, 64, seed=s) for s in (4, 5)]), PROMPTS[6:8]
    model, tok = tiny_clip["model"], tiny_clip["processor"].tokenizer
    with torch.no_grad():
        pixels = hps_pixels(images, 32, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
        e_i = model.get_image_features(pixel_values=pixels)
        e_t = model.get_text_features(**tok(prompts, padding="max_length", max_length=77, return_tensors="pt"))
        e_i, e_t = getattr(e_i, "pooler_output", e_i), getattr(e_t, "pooler_output", e_t)
        got = load_scorer("clip", tiny_clip["clip"], feedback=True)(images, prompts)
        torch.testing.assert_close(got, 100 * F.cosine_similarity(e_i, e_t), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, load_scorer("clip-raw", tiny_clip["clip"])(images, prompts), atol=1e-2)
        v20 = load_scorer("hps", tiny_hps["folder"], clip_path=tiny_clip["clip"], feedback=True)(images, prompts)
        v21 = load_scorer("hps", tiny_hps["folder"], clip_path=tiny_clip["clip"])(images, prompts)
    assert not torch.allclose(v20, v21, atol=1e-3)  # the other file
