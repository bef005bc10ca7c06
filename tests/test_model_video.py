"""Video path: our streamed SAM2 propagation == transformers' own SAM2 video inference; the keyframe
language prompts == a direct decoder reference; the memory key map; Sa2VA's video prompt layout."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from maskloop.model.checkpoints import SAM_PREFIX, CheckpointError
from maskloop.model.prompts import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES
from maskloop.model.sequence import assemble
from maskloop.model.video import (
    Prompt,
    SAM2Propagator,
    VideoSegmenter,
    _video_model_class,
    build_sam2_video,
    hf_key_to_memory,
    keyframe_indices,
    memory_dim,
    memory_key_to_hf,
    seg_prompts,
    video_seg_parts,
)
from tests.conftest import WORDS


def make_video_tiny(seed: int = 0):
    """The tiny preset with a 128-wide SAM2 (transformers' video memory needs a multiple of 64 above 64)."""
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer

    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.sam2.prompt_dim, cfg.sam2.decoder_mlp_dim = 128, 128
    m = GroundedMLLM(cfg, build_word_tokenizer(WORDS)).eval()
    with torch.no_grad():  # random weights: make the object score positive so the masks are not all -1024
        m.sam.sam.mask_decoder.pred_obj_score_head.proj_out.bias.add_(20.0)
    return m


@pytest.fixture(scope="module")
def tiny():
    m = make_video_tiny()
    with pytest.warns(UserWarning, match="no SAM2 memory weights"):
        vm = build_sam2_video(m)
    return m, vm


def _video(T, G, seed=0):
    """A moving bright square on noise: (T, 3, G, G) uint8, and its first-frame mask."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 100, (T, 3, G, G), generator=g, dtype=torch.uint8)
    for t in range(T):
        v[t, :, 20 + 2 * t : 60 + 2 * t, 30:70] = 230
    m1 = torch.zeros(G, G, dtype=torch.bool)
    m1[20:60, 30:70] = True
    m2 = torch.zeros(G, G, dtype=torch.bool)
    m2[80:120, 5:40] = True
    return v, [m1, m2]


# 'first' follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L631 (frame_idx
#   < 5, in predict_forward L584-L766) (commit d01bf3f); 'uniform' is maskloop's own (not cited)
def test_keyframes():
    assert keyframe_indices(100, "first") == [0, 1, 2, 3, 4]
    assert keyframe_indices(3, "first") == [0, 1, 2]
    assert keyframe_indices(101, "uniform") == [0, 25, 50, 75, 100]
    assert keyframe_indices(2, "uniform") == [0, 1]
    with pytest.raises(ValueError):
        keyframe_indices(5, "middle")


# follows huggingface/transformers v5.24.0 (installed wheel): src/transformers/models/sam2_video/
#   modeling_sam2_video.py L109-L348 (Sam2VideoInferenceSession), L1776-L1900 (Sam2VideoModel.forward),
#   L2802-L2857 (propagate_in_video_iterator); processing_sam2_video.py L736-L801
#   (process_new_mask_for_video_frame)
def test_propagation_equals_transformers_video_inference(tiny):
    """Same first-frame mask prompts: our streamed propagation (frames added as reached and released,
    old outputs trimmed) gives the very logits of transformers' whole-video session on every frame."""
    import copy

    from transformers import Sam2VideoInferenceSession, Sam2VideoModel, Sam2VideoProcessor

    model, vm0 = tiny
    cfg = copy.deepcopy(vm0.config)
    cfg.max_object_pointers_in_encoder = 8  # an 8-frame memory window: 11 frames exercise the trimming
    vm = _video_model_class()(cfg).eval()  # ours, with SAM2's 64-wide memory: transformers' own modules
    vm.keep_absent_logits = False  # transformers' NO_OBJ_SCORE fill (the reference's)
    vm.load_state_dict(vm0.state_dict())
    G = model.cfg.sam2.image_size
    T = 11
    video, masks = _video(T, G)
    prop = SAM2Propagator(model.sam, vm)
    assert prop.keep == 8
    ours = list(prop.propagate(iter(video), T, {0: Prompt(video[0], masks=torch.stack(masks))}))

    ref_vm = Sam2VideoModel(vm.config).eval()
    ref_vm.load_state_dict(vm.state_dict())
    norm = torch.stack([prop.normalise(f) for f in video])
    session = Sam2VideoInferenceSession(video=norm, video_height=G, video_width=G, dtype=torch.float32)
    Sam2VideoProcessor.process_new_mask_for_video_frame(SimpleNamespace(target_size=G), session, 0, [1, 2],
                                                        [m.clone() for m in masks])
    with torch.inference_mode():
        ref_vm(session, frame_idx=0)
        ref = [(o.frame_idx, o.pred_masks[:, 0]) for o in ref_vm.propagate_in_video_iterator(session)]

    assert [i for i, _ in ours] == [i for i, _ in ref] == list(range(T))
    nontrivial = 0
    for (_, a), (_, b) in zip(ours, ref):
        assert torch.equal(a, b)
        up = torch.nn.functional.interpolate(a[:, None], size=(G, G), mode="bilinear")[:, 0] > 0
        nontrivial += int(up.any() and not up.all())
    assert nontrivial >= T // 2  # the masks are not all empty / all full


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/sam2.py L316-L358 (inject_language_embd,
#   language_embd_inference) and modeling_sa2va_chat.py L758 ([SEG] states -> SAM2) (commit d01bf3f)
def test_language_keyframes_equal_direct_decoder(tiny):
    """Sa2VA's keyframe prompt: sparse = [empty-point tokens, [SEG] embedding], no mask, no memory,
    SAM2's multimask choice (best predicted IoU) — per object, against our batched-over-objects path."""
    model, vm = tiny
    G, C = model.cfg.sam2.image_size, model.cfg.sam2.prompt_dim
    T = 6
    video, _ = _video(T, G, seed=1)
    lang = torch.randn(3, C, generator=torch.Generator().manual_seed(3))
    prop = SAM2Propagator(model.sam, vm)
    keys = [0, 2, 4]
    session = prop.new_session(T, 3)
    for k in keys:
        session.add_new_frame(prop.normalise(video[k]), k)
        with torch.inference_mode():
            prop._add_language(session, k, lang)
    sam = model.sam.sam
    multimask = vm._use_multimask(True, None)
    with torch.no_grad():
        for k in keys:
            feats = model.sam.encode(video[k][None])  # + no_memory_embedding, conv_s0 / conv_s1 applied
            for i in range(3):
                pts = torch.zeros(1, 1, 1, 2)
                lbl = -torch.ones(1, 1, 1, dtype=torch.int32)
                sparse, dense = sam.prompt_encoder(input_points=pts, input_labels=lbl, input_boxes=None, input_masks=None)
                sparse = torch.cat([sparse, lang[i].view(1, 1, 1, C)], 2)
                low, iou, _, score = sam.mask_decoder(
                    image_embeddings=feats.embed, image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
                    high_resolution_features=list(feats.high_res))
                best = low[0, 0, int(iou[0, 0].argmax())] if multimask else low[0, 0, 0]
                if float(score.flatten()[0]) <= 0 and not vm.keep_absent_logits:
                    best = torch.full_like(best, -1024.0)
                got = session.output_dict_per_obj[i]["cond_frame_outputs"][k]
                torch.testing.assert_close(got["pred_masks"][0, 0], best, atol=1e-5, rtol=1e-5)
                assert "maskmem_features" in got  # memory encoded at insertion


def test_memory_key_map_round_trip(tiny):
    model, vm = tiny
    n_down = len(vm.memory_encoder.mask_downsampler.layers)
    from maskloop.model.video import _is_memory_param

    mem = {k: v for k, v in vm.state_dict().items() if _is_memory_param(k)}
    assert len(mem) > 20
    published = {}
    for k, v in mem.items():
        pk = hf_key_to_memory(k, n_down)
        assert pk is not None, k
        assert memory_key_to_hf(pk, n_down) == k
        published[SAM_PREFIX + pk] = torch.randn_like(v)
    assert memory_key_to_hf("memory_encoder.fuser.layers.0.gamma", n_down) == "memory_encoder.memory_fuser.layers.0.scale"
    assert memory_key_to_hf("memory_attention.layers.2.cross_attn_image.out_proj.weight", n_down) == \
        "memory_attention.layers.2.cross_attn_image.o_proj.weight"
    assert memory_key_to_hf(f"memory_encoder.mask_downsampler.encoder.{3 * n_down}.bias", n_down) == \
        "memory_encoder.mask_downsampler.final_conv.bias"
    m2 = model
    m2.sam_memory_weights = published  # as load_published_state keeps them
    vm2 = build_sam2_video(m2)
    sd = vm2.state_dict()
    for k, v in published.items():
        assert torch.equal(sd[memory_key_to_hf(k[len(SAM_PREFIX):], n_down)], v)
    for k, v in m2.sam.sam.state_dict().items():
        assert torch.equal(sd[k], v)
    m2.sam_memory_weights = {**published, SAM_PREFIX + "memory_attention.bogus.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unknown"):
        build_sam2_video(m2)
    m2.sam_memory_weights = {k: v for k, v in published.items() if "memory_attention.layers.0.linear1" not in k}
    with pytest.raises(CheckpointError, match="missing"):
        build_sam2_video(m2)
    del m2.sam_memory_weights


# follows facebookresearch/sam2 sam2/modeling/sam2_base.py _prepare_memory_conditioned_features (object
#   pointers split into C / mem_dim tokens when mem_dim < C, kept whole when equal) and
#   sam2/configs/sam2/sam2_hiera_l.yaml (memory_attention cross_attention kv_in_dim: 64 = mem_dim); transformers
#   v5.24.0 modeling_sam2_video.py L950 (kv_in_dim=64 hard-coded), L2438-L2445 (split only when mem_dim < C)
@pytest.mark.parametrize("preset,prompt_dim,mem", [("tiny", 32, 32), ("tiny-demo", 64, 64), ("tiny", 128, 64)])
def test_narrow_presets_propagate(preset, prompt_dim, mem):
    """The tiny presets' SAM2 (32 and 64 wide) get a memory width that divides prompt_dim; the memory
    attention reads memories of that width, object pointers enter as prompt_dim / mem_dim tokens, and a
    mask prompt propagates through a clip."""
    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer

    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.sam2.prompt_dim = prompt_dim
    assert memory_dim(prompt_dim) == mem
    m = GroundedMLLM(cfg, build_word_tokenizer(WORDS)).eval()
    with pytest.warns(UserWarning, match="no SAM2 memory weights"):
        vm = build_sam2_video(m)
    assert vm.mem_dim == mem
    for layer in vm.memory_attention.layers:
        assert layer.cross_attn_image.k_proj.in_features == mem == layer.cross_attn_image.v_proj.in_features
    # object pointers of 3 frames, (1, 1, C) each as stored: SAM2's layout is (3 * C / mem, 1, mem), pointer
    # k's C channels split in order into consecutive tokens, each token with its pointer's position embedding
    toks = [torch.randn(1, 1, prompt_dim) for _ in range(3)]
    ptrs, pos = vm._process_object_pointers([1, 2, 3], toks, 16, 1, prompt_dim, "cpu")
    splits = prompt_dim // mem
    ref = torch.cat([t.reshape(splits, 1, mem) for t in toks])
    assert torch.equal(ptrs, ref) and pos.shape == (3 * splits, 1, mem)
    G, T = cfg.sam2.image_size, 7
    video, masks = _video(T, G)
    prop = SAM2Propagator(m.sam, vm)
    out = list(prop.propagate(iter(video), T, {0: Prompt(video[0], masks=masks[0][None])}))
    assert [i for i, _ in out] == list(range(T))
    assert all(o.shape == (1, G // 4, G // 4) and torch.isfinite(o).all() for _, o in out)


# follows magic-research/Sa2VA projects/llava_sam2/evaluation/dataset/refVOS.py L13, L98 ('Please segment
#   {}.'), projects/llava_sam2/hf/models/modeling_sa2va_chat.py L701 (image tokens once per frame),
#   projects/llava_sam2/datasets/ReVOS_Dataset.py L49 ('Sure, [SEG].') (commit d01bf3f)
def test_video_prompt_is_sa2va_string(tiny):
    model, _ = tiny
    b = model.builder
    n_f = 3
    parts = video_seg_parts(b, n_f, b.expressions(["red circle", "blue square left"]))
    asm = assemble(parts, 2, b.pad_id, torch.device("cpu"))
    t = TEMPLATES[model.cfg.template]
    block = IMG_START + IMG_CONTEXT * b.n_img + IMG_END + "\n"
    for row, expr in enumerate(["red circle", "blue square left"]):
        text = t.user_prefix + block * n_f + f"Please segment {expr}." + t.user_suffix + "Sure, [SEG]." + t.suffix
        want = model.tokenizer.encode(text, add_special_tokens=False)
        got = asm.input_ids[row][asm.attention_mask[row].bool()].tolist()
        assert got == want


@pytest.mark.filterwarnings("ignore:the model holds no SAM2 memory weights")
def test_segmenter_batched_over_expressions(tiny):
    model, _ = tiny
    S = model.cfg.vision.image_size
    pv = torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(0))
    texts = ["red circle", "blue square left", "a small green triangle"]
    both = seg_prompts(model, pv, texts, protocol="teacher_forced")["prompts"]
    one = torch.cat([seg_prompts(model, pv, [t], protocol="teacher_forced")["prompts"] for t in texts])
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(7)]
    seg = VideoSegmenter(model, keyframes="uniform", protocol="teacher_forced")
    out = list(seg.segment(lambda i: frames[i], lambda: iter(frames), len(frames), texts[:2]))
    assert [i for i, _ in out] == list(range(7))
    assert all(m.shape == (2, 30, 40) and m.dtype == bool for _, m in out)
    assert seg.no_seg == 0 and seg.answers is None and seg.prompted == [True, True]
    # generation (the default): the random model writes no [SEG]: empty masks on every frame, counted
    gen = VideoSegmenter(model, keyframes="uniform")
    out = list(gen.segment(lambda i: frames[i], lambda: iter(frames), len(frames), texts[:2]))
    assert [i for i, _ in out] == list(range(7)) and not any(m.any() for _, m in out)
    assert gen.no_seg == 2 and len(gen.answers) == 2 and gen.prompted == [False, False]
    with pytest.raises(ValueError, match="declared"):
        list(seg.segment(lambda i: frames[i], lambda: iter(frames[:5]), 7, texts[:1]))


@pytest.mark.filterwarnings("ignore:the model holds no SAM2 memory weights")
def test_cli_video_verbs(tiny, tmp_path, monkeypatch, capsys):
    """``segment --video`` (folder of frames and mp4) and ``eval --video-dataset`` through the CLI."""
    import maskloop.inference as inference
    from maskloop.cli import main
    from maskloop.data.fixtures import _write_mp4, moving_objects, write_mevis

    model, _ = tiny
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: model)
    frames, _, names = moving_objects(np.random.default_rng(0), 6, (40, 56))
    d = tmp_path / "frames"
    d.mkdir()
    for t, f in enumerate(frames):
        f.save(d / f"img_{t:03d}.png")
    out = tmp_path / "seg"
    assert main(["segment", "-c", str(tmp_path), "--video", str(d), "--text", "the red rectangle",
                 "--text", "the green ellipse", "--out-dir", str(out), "--keyframes", "uniform"]) == 0
    m0 = sorted((out / "masks" / "0_the_red_rectangle").glob("*.png"))
    assert [p.stem for p in m0] == [f"img_{t:03d}" for t in range(6)]
    assert Image.open(m0[0]).size == (56, 40)
    gif = Image.open(out / "overlay.gif")
    assert gif.n_frames == 6
    _write_mp4(tmp_path / "clip.mp4", [np.asarray(f) for f in frames])
    assert main(["segment", "-c", str(tmp_path), "--video", str(tmp_path / "clip.mp4"), "--text", "a red square",
                 "--out-dir", str(tmp_path / "seg2")]) == 0
    assert len(list((tmp_path / "seg2" / "masks" / "0_a_red_square").glob("*.png"))) == 6
    capsys.readouterr()
    assert main(["segment", "-c", str(tmp_path), "--video", str(tmp_path / "clip.mp4"), "--text", "a red square",
                 "--out-dir", str(tmp_path / "seg3"), "--protocol", "teacher_forced"]) == 0
    assert "no usable [SEG]" not in capsys.readouterr().out  # a teacher-forced answer always holds its [SEG]
    assert main(["segment", "-c", str(tmp_path), "--video", str(tmp_path / "nope.mp4"), "--text", "x"]) == 2
    assert "error:" in capsys.readouterr().err

    info = write_mevis(tmp_path / "mevis", "valid_u", num_videos=2, num_frames=4)
    assert main(["eval", "-c", str(tmp_path), "--video-dataset", "mevis", "--video-data", info["root"],
                 "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "J&F" in printed and "all" in printed
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["groups"]["all"]["n"] == 6 and 0.0 <= res["groups"]["all"]["J&F"] <= 1.0


def test_batched_objects_equal_one_at_a_time(tiny):
    """Language prompts of 3 objects on keyframes 0 and 3 in one pass == each object alone, every frame."""
    model, vm = tiny
    G, C = model.cfg.sam2.image_size, model.cfg.sam2.prompt_dim
    T = 6
    video, _ = _video(T, G, seed=2)
    lang = torch.randn(3, C, generator=torch.Generator().manual_seed(5))
    prop = SAM2Propagator(model.sam, vm)

    def run(rows):
        prompts = {k: Prompt(video[k], language=lang[rows]) for k in (0, 3)}
        return torch.stack([low for _, low in prop.propagate(iter(video), T, prompts)])  # (T, n, g, g)

    both = run([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(both[:, i : i + 1], run([i]), atol=1e-4, rtol=1e-4)


def _reference_seg_state(model, pv, text, answer_ids):
    """A straightforward reference: Sa2VA's video prompt as one string (image blocks, question, template),
    tokenised with the tokenizer's own special tokens, the generated tokens appended, one unpadded forward,
    the image tokens written into the <IMG_CONTEXT> positions; text_hidden_fcs of the last hidden state at
    the first [SEG] of the answer."""
    b, t = model.builder, TEMPLATES[model.cfg.template]
    block = IMG_START + IMG_CONTEXT * b.n_img + IMG_END + "\n"
    ids = model.tokenizer.encode(t.user_prefix + block * pv.shape[0] + f"Please segment {text}." + t.user_suffix)
    ids = torch.tensor(ids + list(answer_ids))[None]
    emb = model.embed_tokens(ids)
    feats = model.image_tokens(pv)
    emb[ids == b.img_ctx_id] = feats.reshape(-1, feats.shape[-1])
    L = ids.shape[1]
    hidden = model.run_llm(emb, torch.ones(1, L, dtype=torch.long), torch.arange(L)[None])
    seg_pos = L - len(answer_ids) + list(answer_ids).index(b.seg_id)
    return model.text_hidden_fcs(hidden[0, seg_pos])


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py L729-L758, L768-L773 (predict_forward:
#   generate, hidden states of the generated tokens, get_seg_hidden_states over sequences[0][:-1], the [SEG]
#   ones -> text_hidden_fcs) and projects/llava_sam2/evaluation/ref_vos_eval.py L161-L173 (the first [SEG]'s
#   masks; none -> zero masks) (commit d01bf3f)
@torch.no_grad()
def test_generated_seg_state_equals_full_forward(tiny, monkeypatch):
    """Video [SEG] prompts from the generated answer == the reference's hidden state at the generated [SEG]."""
    from maskloop.model.grounded import Generated

    model, _ = tiny
    S = model.cfg.vision.image_size
    pv = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    texts = ["red circle", "a small blue square left of the triangle", "green"]  # rows padded differently
    seg_id, tok = model.builder.seg_id, model.tokenizer
    # 1. real greedy generation, pushed to say [SEG] at every step: the first [SEG] is the first answer token
    orig = model.lm_logits
    monkeypatch.setattr(model, "lm_logits", lambda h: orig(h).index_add(-1, torch.tensor([seg_id]),
                                                                       torch.full((*h.shape[:-1], 1), 1e4)))
    r = seg_prompts(model, pv, texts, max_new_tokens=3)
    assert r["rows"].tolist() == [0, 1, 2]
    for i, text in enumerate(texts):
        ref = _reference_seg_state(model, pv, text, [seg_id, seg_id])  # the 2 tokens fed back of 3
        torch.testing.assert_close(r["prompts"][i], ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(model, "lm_logits", orig)
    # 2. chosen answers: [SEG] mid-answer; none; [SEG] only as the last token of a cut answer (never fed
    #    back: no prompt, as in Sa2VA); two [SEG] (the first kept)
    words = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    answers = [words("a red [SEG] circle"), words("a red circle"), words("a red circle left of [SEG]"), words("[SEG] red [SEG]")]
    T = 6
    assert len(answers[2]) == T  # cut at max_new_tokens
    ids = torch.full((4, T), model.builder.pad_id)
    for i, a in enumerate(answers):
        ids[i, : len(a)] = torch.tensor(a)
    lengths = torch.tensor([len(a) for a in answers])
    finished = torch.tensor([True, True, False, True])
    monkeypatch.setattr(model, "generate", lambda *a, **k: Generated(ids, lengths, finished))
    four = [*texts, "blue"]
    r = seg_prompts(model, pv, four, max_new_tokens=T)
    assert r["rows"].tolist() == [0, 3]
    for j, i in enumerate([0, 3]):
        torch.testing.assert_close(r["prompts"][j], _reference_seg_state(model, pv, four[i], answers[i]),
                                   atol=1e-5, rtol=1e-5)
    assert r["answers"][1] == tok.decode(answers[1], skip_special_tokens=False)


# follows magic-research/Sa2VA projects/llava_sam2/hf/models/sam2.py L3303-L3315 (SAM2Base._forward_sam_heads:
#   the NO_OBJ_SCORE fill commented out) and L2608-L2615 (SAM2's own fill) (commit d01bf3f); transformers
#   v5.24.0 modeling_sam2_video.py L2108-L2115 (the fill)
@torch.no_grad()
def test_absent_object_logits_kept_as_sa2va(tiny):
    """Object scores all negative: Sa2VA's SAM2 keeps the mask logits (keyframe = the direct decoder
    output) on keyframes and tracked frames; transformers' behaviour (keep_absent_logits off) fills -1024."""
    import copy

    model, vm0 = tiny
    vm = copy.deepcopy(vm0)
    vm.mask_decoder.pred_obj_score_head.proj_out.bias.sub_(60.0)  # every object "absent"
    G, C = model.cfg.sam2.image_size, model.cfg.sam2.prompt_dim
    T = 4
    video, _ = _video(T, G, seed=3)
    lang = torch.randn(2, C, generator=torch.Generator().manual_seed(7))
    prop = SAM2Propagator(model.sam, vm)
    runs = {}
    for keep in (True, False):
        vm.keep_absent_logits = keep
        runs[keep] = [low for _, low in prop.propagate(iter(video), T, {0: Prompt(video[0], language=lang)})]
    assert all(bool((low == -1024.0).all()) for low in runs[False])
    ref = model.sam.decode(model.sam.encode(video[0][None]).index(torch.zeros(2, dtype=torch.long)), lang[:, None])
    torch.testing.assert_close(runs[True][0], ref, atol=1e-5, rtol=1e-5)
    for low in runs[True][1:]:  # tracked frames: the decoder's own logits, not the fill
        assert torch.isfinite(low).all() and not bool((low == -1024.0).any())


@pytest.mark.filterwarnings("ignore:the model holds no SAM2 memory weights")
@torch.no_grad()
def test_generated_answers_without_seg_get_empty_masks(tiny, monkeypatch):
    """Two expressions, only the first answered with a [SEG]: the second gets empty masks on every frame,
    the first the masks it gets alone."""
    from maskloop.model.grounded import Generated

    model, _ = tiny
    tok = model.tokenizer
    seg_answer = tok.encode("a red [SEG] circle", add_special_tokens=False)
    no_seg = tok.encode("a red circle", add_special_tokens=False)

    def fake_generate(emb, *a, **k):
        rows = [seg_answer, no_seg][: emb.shape[0]]
        ids = torch.full((len(rows), 5), model.builder.pad_id)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return Generated(ids, torch.tensor([len(r) for r in rows]), torch.ones(len(rows), dtype=torch.bool))

    monkeypatch.setattr(model, "generate", fake_generate)
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(7)]
    seg = VideoSegmenter(model)
    both = np.stack([m for _, m in seg.segment(lambda i: frames[i], lambda: iter(frames), 7, ["red", "blue"])])
    assert seg.prompted == [True, False] and seg.no_seg == 1
    alone = np.stack([m for _, m in seg.segment(lambda i: frames[i], lambda: iter(frames), 7, ["red"])])
    assert not both[:, 1].any()
    assert (both[:, 0] == alone[:, 0]).mean() > 0.999 and alone[:, 0].any()
