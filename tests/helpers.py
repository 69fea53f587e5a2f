"""Helpers shared by several test files: generated data-set layouts, the tiny network, a subprocess runner.

Test files import from here (never from each other); fixtures live in conftest.py.
"""

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scripts.networks import UNITransUNet

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "bundle" / "configs" / "train.json"


def fake_glas(root: Path, n_train=20, n_test_a=3, n_test_b=2, suffix=".bmp"):
    """GlaS layout: instance-id annotations, Grade.csv with the official header; 8 benign, 12 malignant."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for subset, count in (("train", n_train), ("testA", n_test_a), ("testB", n_test_b)):
        for i in range(1, count + 1):
            name = f"{subset}_{i}"
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / f"{name}{suffix}")
            anno = np.zeros((24, 32), np.uint8)
            anno[2:8, 2:8], anno[12:20, 10:20] = 1, 2  # two glands, one id each
            Image.fromarray(anno).save(root / f"{name}_anno{suffix}")
            grade = "benign" if i <= (8 if subset == "train" else 1) else "malignant"
            rows.append(f"{name},{i}, {grade}, x")
    (root / "Grade.csv").write_text("\n".join(rows) + "\n")
    return root


def rgb(path, h=16, w=16, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def grey(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def fake_ebhi(root):
    """Six class folders; 10 images each, Adenocarcinoma 20; one Polyp image without a label."""
    from scripts.data.adapters import EBHI_CLASSES

    for cls in EBHI_CLASSES:
        for i in range(20 if cls == "Adenocarcinoma" else 10):
            rgb(root / cls / "image" / f"GT{i}.png")
            if not (cls == "Polyp" and i == 3):
                grey(root / cls / "label" / f"GT{i}.png", np.full((16, 16), 200))
    return root


def fake_kpi(root):
    base = root / "Task1_patch_level"
    for split, models in (("train", ("DN", "normal")), ("validation", ("DN",)), ("test", ("DN",))):
        for model in models:
            for case in range(2):
                for k in range(2):
                    stem = f"case{case}_{k}"
                    rgb(base / split / model / f"c{case}" / "img" / f"{stem}_img.jpg", 64, 64, 120)
                    mask = np.zeros((64, 64))
                    mask[8:40, 8:40] = 250
                    mask[50:60, 50:60] = 90  # JPEG-like noise below the threshold
                    grey(base / split / model / f"c{case}" / "mask" / f"{stem}_mask.jpg", mask)
    return root


# Tiny encoders keep every network test on CPU within seconds.
TINY_ENCODER = {"depth": 2}
TINY_DECODER = {"skip_channels": (32, 16, 8), "decoder_head_channels": 32, "decoder_channels": (16, 16, 8, 8), "embed_dim": 16}

# The network keys of the tiny test network (tiny_network()), and the same as command-line overrides.
TINY_KEYS = {"encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "skip_channels": [16, 8, 8],
             "decoder_channels": [16, 16, 8, 8]}
NET_ARGS = [token for key, value in TINY_KEYS.items() for token in (f"--{key}", json.dumps(value))]
# inference.json's model_overrides for the tiny network saved or exported without a record (window 32).
LEGACY_OVERRIDES = {**TINY_KEYS, "roi_size": [32, 32]}


def tiny_network():
    """The tiny UNI-TransUNet the ONNX and Deploy tests export (seeded, eval mode)."""
    torch.manual_seed(0)
    return UNITransUNet(out_channels=2, encoder_name="vit_tiny", encoder_kwargs={"depth": 1},
                        skip_channels=(16, 8, 8), decoder_channels=(16, 16, 8, 8), embed_dim=512).eval()


def tiny_record(**changes) -> dict:
    """The record training writes into model.pt for ``tiny_network()`` (window 32 x 32), with ``changes``."""
    from scripts.networks import model_record

    return model_record(**{**TINY_KEYS, "roi_size": [32, 32], **changes})


def save_tiny_model(path, record: dict | None = None, network=None) -> Path:
    """``tiny_network()`` (or ``network``) saved at ``path`` as training saves it: weights and record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": (network or tiny_network()).state_dict(), "config": record or tiny_record()}, path)
    return path


def subprocess_env(**extra):
    """The environment of a test's subprocess: this process's environment as it is now (so variables a test sets
    with ``monkeypatch.setenv`` reach the subprocess), offline, the repository on ``PYTHONPATH``, then ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def run_python(args, cwd=REPO, repo_on_path=True, env=None, file_permissions=False):
    """Runs ``python <args>`` offline in ``cwd`` (the repository root by default); returns the completed process.

    ``repo_on_path=False`` leaves the repository off ``PYTHONPATH``, so a packed bundle imports its own scripts/.
    ``env``: more environment variables for the subprocess. ``file_permissions=True``: file permissions apply to
    the subprocess even as root (``drop_root_file_access``).
    """
    env = subprocess_env(**(env or {}))
    if not repo_on_path:
        env.pop("PYTHONPATH")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=drop_root_file_access if file_permissions else None)


# A tiny MPAMatch run on the demo fixture: 4 unlabeled images in batches of 2 make 2 iterations an epoch; 3 epochs,
# validation on the 2 validation images after each.
TINY_MPAMATCH = {
    "method": "mpamatch", "encoder_name": "vit_tiny", "encoder_kwargs": {"depth": 1}, "skip_channels": [16, 8, 8],
    "decoder_channels": [16, 16, 8, 8], "embed_dim": 32, "roi_size": [32, 32], "labeled_batch_size": 2,
    "unlabeled_batch_size": 2, "text_cfg": {"layers": 1}, "pixels_per_class": 32, "confidence_threshold": 0.0,
    "num_epochs": 3, "val_interval": 1, "ema_decay": 0.9,  # the averaged weights must resume and shard exactly too
}


def assert_same(a, b, where=""):
    """Asserts two saved states are equal: every tensor, counter and value, nested."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where} keys differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# CONCH's text tower at tiny width, CONCH's ids for <pad>, <start_of_text>, <end_of_text>, and sentences to train a
# byte-level BPE on: what the CONCH tests load instead of the gated files.
CONCH_TINY = {"context_length": 24, "vocab_size": 400, "width": 32, "heads": 4, "layers": 2, "embed_dim": 16}
CONCH_PAD, CONCH_BOS, CONCH_EOS = 0, 1, 2
CONCH_CORPUS = ["a histopathology image of colon gland.", "background stroma with x x x x placeholders.",
                "Glomerulus in renal tissue, PAS stain.", "x marks the gland; X marks the stroma."] * 20


def write_conch_tokenizer(path, corpus=CONCH_CORPUS):
    """A byte-level, lower-casing BPE with CONCH's special tokens, ids and start / end template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONCH_TINY["vocab_size"], show_progress=False,
                                  special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<start_of_text> $A <end_of_text>", special_tokens=[
        ("<start_of_text>", CONCH_BOS), ("<end_of_text>", CONCH_EOS)])
    tok.save(str(path))
    return path


def conch_state(cfg=CONCH_TINY, seed=0, constant=False):
    """A whole CoCa checkpoint in CONCH's key layout, shapes written from its code, with the parts the text branch
    ignores. ``constant=True`` fills it with expanded constants, so a file of the full-size layout stays tiny."""
    g = torch.Generator().manual_seed(seed)
    w, e, n = cfg["width"], cfg["embed_dim"], cfg["context_length"]

    def rand(*shape, mean=0.0):
        if constant:
            return torch.tensor(mean).expand(*shape)  # torch.save keeps the one-value storage
        return mean + 0.1 * torch.randn(*shape, generator=g)

    state = {"text.token_embedding.weight": rand(cfg["vocab_size"], w), "text.positional_embedding": rand(n, w),
             "text.cls_emb": rand(w), "text.text_projection": rand(w, e),
             "text.ln_final.weight": rand(w, mean=1.0), "text.ln_final.bias": rand(w)}
    for i in range(cfg["layers"]):
        block = f"text.transformer.resblocks.{i}."
        state.update({
            block + "ln_1.weight": rand(w, mean=1.0), block + "ln_1.bias": rand(w),
            block + "attn.in_proj_weight": rand(3 * w, w), block + "attn.in_proj_bias": rand(3 * w),
            block + "attn.out_proj.weight": rand(w, w), block + "attn.out_proj.bias": rand(w),
            block + "ln_2.weight": rand(w, mean=1.0), block + "ln_2.bias": rand(w),
            block + "mlp.c_fc.weight": rand(4 * w, w), block + "mlp.c_fc.bias": rand(4 * w),
            block + "mlp.c_proj.weight": rand(w, 4 * w), block + "mlp.c_proj.bias": rand(w),
        })
    state.update({"visual.trunk.pos_embed": rand(1, 5, 8), "visual.attn_pool_contrast.query": rand(1, 8),
                  "text_decoder.resblocks.0.attn.in_proj_weight": rand(3 * w, w), "logit_scale": rand(())})
    return state


def reference_text_blocks(params, x, mask, heads):
    """A text tower's residual attention blocks, from CLIP's definition: pre-norm multi-head self-attention with an
    additive mask (n x n, or per text B x n x n), then a pre-norm GELU MLP; ``params`` holds ``resblocks.<i>.*``
    tensors under ``transformer.``."""
    b, n, w = x.shape
    layers = len({k.split(".")[2] for k in params if k.startswith("transformer.resblocks.")})
    mask = mask if mask.ndim == 3 else mask.expand(b, n, n)
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        q = {k[len(block):]: v for k, v in params.items() if k.startswith(block)}
        h = torch.nn.functional.layer_norm(x, (w,), q["ln_1.weight"], q["ln_1.bias"])
        heads_of = [t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in
                    torch.nn.functional.linear(h, q["attn.in_proj_weight"], q["attn.in_proj_bias"]).chunk(3, dim=-1)]
        scores = heads_of[0] @ heads_of[1].transpose(-1, -2) / (w // heads) ** 0.5 + mask[:, None]
        attended = (scores.softmax(-1) @ heads_of[2]).transpose(1, 2).reshape(b, n, w)
        x = x + torch.nn.functional.linear(attended, q["attn.out_proj.weight"], q["attn.out_proj.bias"])
        h = torch.nn.functional.layer_norm(x, (w,), q["ln_2.weight"], q["ln_2.bias"])
        hidden = torch.nn.functional.gelu(torch.nn.functional.linear(h, q["mlp.c_fc.weight"], q["mlp.c_fc.bias"]))
        x = x + torch.nn.functional.linear(hidden, q["mlp.c_proj.weight"], q["mlp.c_proj.bias"])
    return x


def clip_encode_text(params, ids, heads, ctx=None):
    """CLIP's encode_text (unnormalised) over the whole context, from its definition: token plus positional
    embeddings, causal attention over every position, the end token (the largest id) layer-normed and projected.
    ``params`` are an open_clip CLIP model's text tensors (``token_embedding.weight`` or, under the CoOp prompt,
    ``token_embedding.embedding.weight``); ``ctx`` overwrites the token embeddings at positions 1..M."""
    embedding = params.get("token_embedding.weight", params.get("token_embedding.embedding.weight"))
    x = embedding[ids]
    if ctx is not None:
        x = torch.cat([x[:, :1], ctx.expand(len(x), -1, -1), x[:, 1 + len(ctx):]], dim=1)
    b, n, w = x.shape
    x = reference_text_blocks(params, x + params["positional_embedding"][:n],
                              torch.full((n, n), float("-inf")).triu(1), heads)
    x = torch.nn.functional.layer_norm(x, (w,), params["ln_final.weight"], params["ln_final.bias"])
    return x[torch.arange(b), ids.argmax(dim=-1)] @ params["text_projection"]


def reference_text_infonce(z, target, raw_text, prompts):
    """L_txt from its definition: the text features ``raw_text`` (C x D') through the prompts' linear map, L2-normalised,
    and the mean over pixels of -log softmax(z . T_c / tau_txt)[target], tau_txt 0.07 or 1 / exp(logit scale clamped
    at log 100)."""
    text = torch.nn.functional.normalize(raw_text @ prompts.projection.weight.t(), dim=-1)
    scale = 1 / 0.07 if prompts.logit_scale is None else prompts.logit_scale.clamp(max=np.log(100.0)).exp()
    return -torch.nn.functional.log_softmax(z @ text.t() * scale, dim=1)[torch.arange(len(z)), target].mean()


def assert_loss_and_gradients_match(loss, expected, params):
    """Asserts that two losses agree to float tolerance, and so do their gradients with respect to each tensor of
    ``params``, every one of which takes part (a gradient above 1e-4 somewhere)."""
    grads, expected_grads = torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)
    assert float(loss.detach()) > 0.1
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, reference in zip(grads, expected_grads):
        size = float(reference.abs().max())
        assert size > 1e-4
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5 * size)


def clip_prompt_features(prompts):
    """``clip_encode_text`` over the whole context of a CLIP ``PromptTextPrototypes``, with its tensors and context."""
    params = {k: v for k, v in prompts.model.state_dict().items() if not k.endswith("ctx")}
    heads = prompts.model.transformer.resblocks[0].attn.num_heads
    return clip_encode_text(params, prompts.token_ids, heads, ctx=prompts.ctx)


# Root reads a file of mode 000 through two capabilities. Tests of unreadable files lower them, so that they run
# under root too (CI runs as root): in this process for the duration of a block, and in subprocesses for good.
_DAC_CAPABILITIES = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
_PR_CAPBSET_DROP = 24
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def without_root_file_access():
    """Within the block this thread cannot read past file permissions, even as root (Linux capabilities).

    Yields whether file permissions now apply to it: True for a user other than root, or as root once the two
    capabilities are lowered; False where they cannot be (not Linux)."""
    if os.geteuid() != 0:
        yield True
        return
    try:
        libc, header, data = _libc(), _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
    except (OSError, AttributeError):
        yield False
        return
    saved = data[0].effective
    data[0].effective &= ~sum(1 << cap for cap in _DAC_CAPABILITIES)
    if libc.capset(ctypes.byref(header), data) != 0:
        yield False
        return
    try:
        yield True
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def drop_root_file_access() -> None:
    """``preexec_fn`` of a subprocess that must not read past file permissions, even as root."""
    if os.geteuid() == 0:
        libc = _libc()
        for cap in _DAC_CAPABILITIES:
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
