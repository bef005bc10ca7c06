"""LLM families, tied embeddings and the export folder.

InternLM2: a state dict written from InternLM2's published names and shapes (``attention.wqkv`` in its
grouped layout, ``wo``, ``feed_forward.w1/w2/w3``, ``attention_norm`` / ``ffn_norm``, ``tok_embeddings``,
``output``) is loaded into our Llama-class model, whose logits must equal a direct computation of
InternLM2's attention / MLP written below from its modeling code.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS

from maskloop.config import ConfigError
from maskloop.model import checkpoints as C
from maskloop.model.grounded import GroundedMLLM
from maskloop.model.presets import get_preset
from maskloop.model.prompts import build_word_tokenizer

LM = "language_model."


def _cfg(arch="InternLM2ForCausalLM", tie=False):
    cfg = get_preset("tiny")
    cfg.llm.architecture = arch
    cfg.llm.rope_scaling = {"type": "dynamic", "factor": 2.0}  # no effect below max_position_embeddings
    cfg.llm.tie_word_embeddings = tie
    cfg.lora.r, cfg.lora.alpha = 4, 8
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return GroundedMLLM(copy.deepcopy(cfg), build_word_tokenizer(WORDS))


# key names follow InternLM/InternLM tools/convert2llama.py L91-L134 (commit fe4c2eb)
def internlm2_state(llm, V, seed=1, with_output=True):
    """InternLM2's published language-model keys (remote-code names) at the given sizes."""
    g = torch.Generator().manual_seed(seed)
    D, H, KV, M = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
    d = D // H
    sd = {LM + "model.tok_embeddings.weight": torch.randn(V, D, generator=g)}
    for i in range(llm.num_layers):
        p = f"{LM}model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = torch.randn((H + 2 * KV) * d, D, generator=g) / math.sqrt(D)
        sd[p + "attention.wo.weight"] = torch.randn(D, H * d, generator=g) / math.sqrt(D)
        sd[p + "feed_forward.w1.weight"] = torch.randn(M, D, generator=g) / math.sqrt(D)
        sd[p + "feed_forward.w3.weight"] = torch.randn(M, D, generator=g) / math.sqrt(D)
        sd[p + "feed_forward.w2.weight"] = torch.randn(D, M, generator=g) / math.sqrt(M)
        sd[p + "attention_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        sd[p + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    sd[LM + "model.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    if with_output:
        sd[LM + "output.weight"] = torch.randn(V, D, generator=g) / math.sqrt(D)
    return sd


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# wqkv grouped layout '(h gs d)' follows InternLM/InternLM tools/convert2llama.py L91-L102 (commit fe4c2eb)
def internlm2_reference_logits(sd, llm, ids):
    """InternLM2's forward, written from its modeling code: wqkv -> 'b q (h gs d) -> b q h gs d'."""
    D, H, KV = llm.hidden_size, llm.num_heads, llm.num_kv_heads
    d, groups, L = D // H, H // KV, ids.shape[0]
    x = sd[LM + "model.tok_embeddings.weight"][ids]  # (L, D)
    inv = 1.0 / (llm.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(L).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (heads, L, d), rotate_half
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    causal = torch.ones(L, L).tril().bool()
    for i in range(llm.num_layers):
        p = f"{LM}model.layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], llm.rms_norm_eps)
        qkv = (h @ sd[p + "attention.wqkv.weight"].t()).view(L, KV, groups + 2, d)
        q = qkv[:, :, :groups].reshape(L, H, d).transpose(0, 1)  # heads (h gs)
        k = qkv[:, :, -2].transpose(0, 1)  # (KV, L, d)
        v = qkv[:, :, -1].transpose(0, 1)
        q, k = rope(q), rope(k)
        out = torch.empty(H, L, d)
        for head in range(H):  # query head h*groups+g reads kv head h
            kv = head // groups
            att = (q[head] @ k[kv].t()) / math.sqrt(d)
            out[head] = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v[kv]
        x = x + out.transpose(0, 1).reshape(L, H * d) @ sd[p + "attention.wo.weight"].t()
        h = _rms(x, sd[p + "ffn_norm.weight"], llm.rms_norm_eps)
        w1, w2, w3 = (sd[p + f"feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
        x = x + (F.silu(h @ w1.t()) * (h @ w3.t())) @ w2.t()
    x = _rms(x, sd[LM + "model.norm.weight"], llm.rms_norm_eps)
    head = sd.get(LM + "output.weight", sd[LM + "model.tok_embeddings.weight"])
    return x @ head.t()


def _our_logits(model, ids):
    with torch.no_grad():
        L = ids.shape[0]
        hidden = model.run_llm(model.embed_tokens(ids[None]), torch.ones(1, L, dtype=torch.long), torch.arange(L)[None])
        return model.lm_logits(hidden)[0]


def _published(model, llm_sd):
    """Our export for the non-LLM parts (vision, mlp1, SAM2, text_hidden_fcs) + the given LLM keys."""
    sd = {k: v for k, v in C.export_state(model).items() if not k.startswith(LM)}
    sd.update(llm_sd)
    return sd


# follows InternLM/InternLM tools/convert2llama.py L91-L134 (wqkv layout, key names) (commit fe4c2eb)
def test_internlm2_published_layout_gives_internlm2_logits():
    cfg = _cfg()
    model = _model(cfg)
    assert type(model.llm).__name__ == "LlamaModel"
    V = model.cfg.llm.vocab_size
    llm_sd = internlm2_state(model.cfg.llm, V)
    C.load_published_state(model, _published(model, llm_sd))
    model.eval()
    ids = torch.tensor([3, 17, 42, 8, 99, 5, 23])
    torch.testing.assert_close(_our_logits(model, ids), internlm2_reference_logits(llm_sd, model.cfg.llm, ids),
                               rtol=1e-4, atol=1e-4)
    # exported back in InternLM2's names, bit-identical (wqkv re-fused in its grouped layout)
    exported = C.export_state(model)
    for k, v in llm_sd.items():
        assert torch.equal(exported[k], v), k
    assert not any(".self_attn." in k or ".mlp." in k for k in exported if k.startswith(LM))


def test_tied_embeddings_fill_lm_head_and_export_without_it():
    cfg = _cfg("Qwen2ForCausalLM", tie=True)
    model = _model(cfg)
    assert model.internvl.lm_head.weight.data_ptr() == model.embed_matrix.data_ptr()
    sd = C.export_state(model)
    assert LM + "lm_head.weight" not in sd
    g = torch.Generator().manual_seed(5)
    sd[LM + "model.embed_tokens.weight"] = torch.randn(*sd[LM + "model.embed_tokens.weight"].shape, generator=g)
    C.load_published_state(model, sd)
    E = sd[LM + "model.embed_tokens.weight"]
    assert torch.equal(model.head_matrix, E) and torch.equal(model.merged_embed_rows()[1], E)
    ids = torch.tensor([4, 9, 30])
    hidden = torch.randn(3, cfg.llm.hidden_size)
    torch.testing.assert_close(model.lm_logits(hidden)[:, ids], hidden @ E[ids].t())
    bad = dict(sd)
    bad[LM + "lm_head.weight"] = E + 1
    with pytest.raises(C.CheckpointError, match="tie_word_embeddings"):
        C.load_published_state(model, bad)


def _folder(tmp_path, arch, tokenizer=True, **extra):
    model = _model(_cfg())
    folder = tmp_path / "pub"
    folder.mkdir(parents=True)
    c = C.published_config(model.cfg)
    c["llm_config"]["architectures"] = [arch]
    c.update(extra)
    (folder / "config.json").write_text(json.dumps(c))
    if tokenizer:
        model.tokenizer.save_pretrained(str(folder))
    return folder


def test_bad_input_unsupported_family_missing_tokenizer_bad_fields(tmp_path):
    folder = _folder(tmp_path, "Phi3ForCausalLM")
    with pytest.raises(ConfigError, match=r"'Phi3ForCausalLM'.*supported: InternLM2ForCausalLM, LlamaForCausalLM, "
                                          r"Qwen2ForCausalLM"):
        C.load_pretrained(folder)
    folder = _folder(tmp_path / "b", "InternLM2ForCausalLM", tokenizer=False)
    with pytest.raises(C.CheckpointError, match="holds no tokenizer"):
        C.load_pretrained(folder)
    for field, value, msg in (("ps_version", "v1", "ps_version"), ("template", "llama2_chat", "unknown chat template")):
        f = _folder(tmp_path / field, "InternLM2ForCausalLM", **{field: value})
        with pytest.raises(ConfigError, match=msg):
            C.config_from_folder(f)
    qwen_vl = {"model_type": "sa2va_chat", "template": "qwen_chat", "vision_config": {}, "text_config": {}}
    with pytest.raises(ConfigError, match="Qwen-VL based Sa2VA checkpoint"):
        C.config_from_published(qwen_vl)
    f = _folder(tmp_path / "rope", "InternLM2ForCausalLM")
    c = json.loads((f / "config.json").read_text())
    c["llm_config"]["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (f / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="rope_scaling"):
        C.config_from_folder(f)


def test_published_config_fields_read(tmp_path):
    folder = _folder(tmp_path, "InternLM2ForCausalLM", select_layer=-2, max_dynamic_patch=6, use_thumbnail=False,
                     dynamic_image_size=True, template="internlm2-chat")
    cfg = C.config_from_folder(folder)
    assert (cfg.llm.architecture, cfg.template, cfg.vision.select_layer) == ("InternLM2ForCausalLM", "internlm2_chat", -2)
    assert (cfg.max_dynamic_patch, cfg.use_thumbnail, cfg.tiles) == (6, False, True)
    assert cfg.llm.rope_scaling == {"type": "dynamic", "factor": 2.0}
    # select_layer honoured: the features are hidden_states[-2] of the ViT
    model = _model(cfg)
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.vision(pixel_values=pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = model.vision_features(pv)
    side = model.cfg.patch_grid
    want = model.internvl.model.pixel_shuffle(want.reshape(1, side, side, -1), scale_factor=0.5).reshape(1, -1, got.shape[-1])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", ["InternLM2ForCausalLM", "Qwen2ForCausalLM"])
def test_export_folder_reloads_bit_identically_with_and_without_base(tmp_path, arch):
    model = _model(_cfg(arch), seed=3)
    with torch.no_grad():  # trained-looking LoRA: merged on export
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    own = C.save_published(model, tmp_path / "own")
    c = json.loads((own / "config.json").read_text())
    assert c["llm_config"]["architectures"] == [arch] and "auto_map" not in c
    assert C.config_from_published(c).llm == model.cfg.llm  # our own config.json is complete
    again = C.load_pretrained(own)
    a, b = C.export_state(model), C.export_state(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # with a base: its config / tokenizer / generation config / remote code copied, one dtype written
    base = tmp_path / "base"
    base.mkdir()
    for f in own.iterdir():
        if not f.name.startswith(("model", "maskloop_config")):
            (base / f.name).write_bytes(f.read_bytes())
    pub = dict(c, auto_map={"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}, torch_dtype="bfloat16")
    (base / "config.json").write_text(json.dumps(pub))
    (base / "modeling_sa2va_chat.py").write_text("# remote code\n")
    (base / "generation_config.json").write_text("{}")
    out = C.save_published(model, tmp_path / "out", base=base)
    for f in ("modeling_sa2va_chat.py", "generation_config.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes()
    written = json.loads((out / "config.json").read_text())
    assert written["auto_map"] == pub["auto_map"] and written["torch_dtype"] == "bfloat16"
    sd = C.read_state_file(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert all(torch.equal(sd[k], a[k].to(torch.bfloat16)) for k in a)
    b16 = C.export_state(C.load_pretrained(out), torch.bfloat16)
    assert all(torch.equal(sd[k], b16[k]) for k in sd)


def test_cli_export_note_and_base_and_companion_template(tmp_path, capsys):
    from maskloop.cli import main

    model = _model(_cfg("Qwen2ForCausalLM"), seed=4)
    src = C.save_published(model, tmp_path / "src")
    assert main(["export", "sa2va", "--checkpoint", str(src), "--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("note:") and "cannot open" in lines[-1] and "--base" in lines[-1]
    assert main(["export", "sa2va", "-c", str(src), "--out", str(tmp_path / "b"), "--base", str(src),
                 "--dtype", "fp16"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert {v.dtype for v in C.read_state_file(tmp_path / "b").values()} == {torch.float16}
    # a training .pth's companion xtuner config names the template
    pth = tmp_path / "run" / "iter_10.pth"
    pth.parent.mkdir()
    torch.save({"state_dict": C.export_state(model)}, pth)
    (pth.parent / "sa2va_1b.py").write_text('path = "./pretrained/InternVL2_5-1B/"\ntemplate = "qwen_chat"\n')
    assert C.companion_template(pth) == "qwen_chat"
    loaded = C.load_pretrained(src, weights=pth)
    assert loaded.cfg.template == "qwen_chat" and loaded.builder.template.stop_words == ("<|im_end|>", "<|endoftext|>")


def test_static_decoder_on_the_llama_classes_equals_the_dynamic_loop():
    """The fused static decoder (q/k/v and gate/up concatenated, no q/k/v bias on Llama/InternLM2) gives the
    dynamic-cache loop's tokens on the Llama classes too (rope without dynamic scaling: the static path)."""
    cfg = _cfg()
    cfg.llm.rope_scaling = None
    model = _model(cfg, seed=4).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    B, L, D = 3, 7, cfg.llm.hidden_size
    emb = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model.generate(emb, mask, pos, 10, static=False)
        b = model.generate(emb, mask, pos, 10, static=True)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths)
