"""CONCH's text tower as the prompt encoder: a synthetic checkpoint in CONCH's key layout and a tokenizer JSON made
here load strictly, and the features equal a reference written from CONCH's published code, context vectors included.

No CONCH weights or tokenizer are downloaded: the tower is tiny, the BPE is trained on a few sentences.
"""

import pytest
import torch
import torch.nn.functional as F

from scripts.errors import ConfigError
from scripts.losses import prototype_infonce
from scripts.networks import ConchTokenizer, build_conch_text_tower, encode_text_features
from scripts.prototypes import PromptTextPrototypes, build_text_prototypes
from tests.helpers import CONCH_BOS as BOS, CONCH_CORPUS as CORPUS, CONCH_EOS as EOS, CONCH_PAD as PAD
from tests.helpers import CONCH_TINY as TINY, assert_loss_and_gradients_match, conch_state, reference_text_blocks
from tests.helpers import reference_text_infonce, write_conch_tokenizer as write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("conch") / "conch_byte_level_bpe_uncased.json", CORPUS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = conch_state()
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def conch_tokenize(tokenizer_file, texts, context_length=TINY["context_length"]):
    """CONCH's tokenize: the file's start / end template, truncated and padded to context - 1, one <pad> appended."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(context_length - 1)
    tok.enable_padding(length=context_length - 1, pad_id=PAD, pad_token="<pad>")
    ids = torch.tensor([enc.ids for enc in tok.encode_batch(texts)])
    return F.pad(ids, (0, 1), value=PAD)


def conch_encode_text(state, ids, heads=TINY["heads"], ctx=None):
    """CONCH's encode_text (unnormalised), from its published code: drop the placeholder slot, append the class
    embedding, causal attention plus the class row's padding mask, the last position layer-normed and projected.
    ``ctx`` overwrites the token embeddings at positions 1..M, as the CoOp prompt does."""
    p = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    text = ids[:, :-1]
    x = p["token_embedding.weight"][text]
    if ctx is not None:
        x = torch.cat([x[:, :1], ctx.expand(len(x), -1, -1), x[:, 1 + len(ctx):]], dim=1)
    x = torch.cat([x, p["cls_emb"].expand(len(x), 1, -1)], dim=1)
    b, n, w = x.shape
    mask = torch.full((n, n), float("-inf")).triu(1).repeat(b, 1, 1)
    cls_keys = torch.cat([torch.ones(b, 1, dtype=torch.bool), text != PAD], dim=1)
    mask[:, -1] = mask[:, -1].masked_fill(~cls_keys, float("-inf"))
    x = reference_text_blocks(p, x + p["positional_embedding"][:n], mask, heads)
    return F.layer_norm(x[:, -1], (w,), p["ln_final.weight"], p["ln_final.bias"]) @ p["text_projection"]


def test_tokenizer_matches_conch_tokenize(tokenizer_file):
    texts = ["X X colon gland.", "Background STROMA", "gland " * 40]
    ours = ConchTokenizer(tokenizer_file, TINY["context_length"] - 1)(texts)
    torch.testing.assert_close(ours, conch_tokenize(tokenizer_file, texts)[:, :-1])
    assert ours.shape == (3, 23) and (ours[:, 0] == BOS).all() and ours[2, -1] == EOS  # long text keeps its end
    torch.testing.assert_close(ours[1], ConchTokenizer(tokenizer_file, 23)("background stroma")[0])  # uncased


def test_checkpoint_loads_strictly_and_matches_conch(checkpoint, tokenizer_file):
    path, state = checkpoint
    model, tokenizer = build_conch_text_tower(path, tokenizer_file, TINY)
    text_state = {k: v for k, v in state.items() if k.startswith("text.")}
    assert set(model.state_dict()) == set(text_state)
    texts = ["a histopathology image of colon gland.", "background stroma", "x"]
    with torch.no_grad():
        features = encode_text_features(model, True, tokenizer(texts))
    torch.testing.assert_close(features, conch_encode_text(state, conch_tokenize(tokenizer_file, texts)),
                               rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("text.cls_emb"), "missing keys (1): text.cls_emb"),
    (lambda s: s.update({"text.positional_embedding": torch.zeros(77, TINY["width"])}),
     "text.positional_embedding (file (77, 32), model (24, 32))"),
    (lambda s: s.update({"text.attn_pool.query": torch.zeros(2)}), "unexpected keys (1): text.attn_pool.query"),
])
def test_misfitting_checkpoint_names_the_keys(tmp_path, tokenizer_file, edit, named):
    state = conch_state()
    edit(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="do not fit CONCH's text tower") as err:
        build_conch_text_tower(tmp_path / "pytorch_model.bin", tokenizer_file, TINY)
    assert named in str(err.value)


def test_prompt_context_through_conch_matches_reference(checkpoint, tokenizer_file):
    path, state = checkpoint
    torch.manual_seed(0)
    prompts = build_text_prototypes("prompt", 2, 8, ["background stroma", "colon gland"], arch="conch", weights=path,
                                    n_ctx=4, text_cfg=TINY, tokenizer_file=tokenizer_file)
    assert isinstance(prompts, PromptTextPrototypes) and prompts.has_language_prior
    assert set(prompts.state_dict()) == {"projection.weight", "model.text.token_embedding.ctx"}
    ids = conch_tokenize(tokenizer_file, ["X X X X background stroma.", "X X X X colon gland."])
    torch.testing.assert_close(prompts.token_ids, ids[:, :-1])
    expected = conch_encode_text(state, ids, ctx=prompts.ctx.detach())
    torch.testing.assert_close(prompts.raw_prototypes().detach(), expected, rtol=1e-4, atol=1e-5)

    z = F.normalize(torch.randn(6, 8), dim=1)
    prototype_infonce(z, torch.tensor([0, 1, 0, 1, 0, 1]), prompts(), prompts.temperature()).backward()
    assert prompts.ctx.grad is not None and prompts.ctx.grad.abs().sum() > 0
    frozen = [p for name, p in prompts.named_parameters() if name.startswith("model.") and not name.endswith("ctx")]
    assert len(frozen) == len(state) - 4  # every text.* tensor of the checkpoint
    assert all(not p.requires_grad and p.grad is None for p in frozen)


@pytest.mark.parametrize("learnable_scale", [False, True])
def test_conch_prompts_run_through_the_positions_the_class_embedding_sees_with_the_same_loss_and_gradients(
        checkpoint, tokenizer_file, learnable_scale):
    path, state = checkpoint
    torch.manual_seed(0)
    descriptions = ["background stroma", "a histopathology image of colon gland."]
    prompts = PromptTextPrototypes(descriptions, embed_dim=8, arch="conch", weights=path, n_ctx=3, text_cfg=TINY,
                                   tokenizer_file=tokenizer_file, learnable_scale=learnable_scale)
    with torch.no_grad():
        prompts.ctx.normal_(std=0.1)  # as large as the checkpoint's token embeddings
    lengths = (prompts.token_ids != PAD).sum(1)
    assert lengths[0] < lengths[1] < TINY["context_length"] - 2
    # CONCH's class embedding (last slot) sees the text and the first pad, which see what precedes them; the rest of
    # the padding is never run
    slot = TINY["context_length"] - 1
    torch.testing.assert_close(prompts.encoded_positions, torch.tensor([*range(int(lengths[1]) + 1), slot]))
    z = F.normalize(torch.randn(10, 8), dim=1).requires_grad_()
    target = torch.tensor([0, 1] * 5)
    trainable = [z] + [p for p in prompts.parameters() if p.requires_grad]
    assert len(trainable) == 3 + learnable_scale  # z, ctx, the linear map (and the logit scale)
    # the definitions: CONCH over its whole context, then L_txt
    ids = conch_tokenize(tokenizer_file, [f"X X X {d.rstrip('.')}." for d in descriptions])
    expected = reference_text_infonce(z, target, conch_encode_text(state, ids, ctx=prompts.ctx), prompts)
    assert_loss_and_gradients_match(prototype_infonce(z, target, prompts(), prompts.temperature()), expected, trainable)


def test_ctx_init_from_words_with_conch(checkpoint, tokenizer_file):
    path, state = checkpoint
    words = "a histopathology image of"
    prompts = PromptTextPrototypes(["a", "b"], embed_dim=16, arch="conch", weights=path, ctx_init=words,
                                   text_cfg=TINY, tokenizer_file=tokenizer_file)
    word_ids = ConchTokenizer(tokenizer_file)(words)[0, 1:5]
    assert prompts.ctx.shape[0] == 4
    torch.testing.assert_close(prompts.ctx.data, state["text.token_embedding.weight"][word_ids])


def test_conch_configuration_errors(checkpoint, tokenizer_file, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match="needs the tokenizer file: set 'text_tokenizer'"):
        build_text_prototypes("prompt", 2, 8, ["a", "b"], arch="conch", weights=path, text_cfg=TINY)
    with pytest.raises(ConfigError, match="absent.json' does not exist"):
        build_conch_text_tower(path, tmp_path / "absent.json", TINY)
    with pytest.raises(ConfigError, match="lacks the special tokens"):
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(tmp_path / "other.json"))
        build_conch_text_tower(path, tmp_path / "other.json", TINY)
    no_x = write_tokenizer(tmp_path / "no_x.json", ["background stroma"] * 5)  # 'x' stays two byte tokens
    with pytest.raises(ConfigError, match="splits the placeholder 'X'"):
        PromptTextPrototypes(["a", "b"], arch="conch", text_cfg=TINY, tokenizer_file=no_x)
    with pytest.raises(ConfigError, match="only text_arch 'conch' reads a tokenizer file"):
        build_text_prototypes("prompt", 2, 8, ["a", "b"], arch="ViT-B-16", tokenizer_file=tokenizer_file)
    with pytest.raises(ConfigError, match=r"text_cfg keys \['depth'\]"):
        build_conch_text_tower(path, tokenizer_file, {"depth": 1})
    with pytest.raises(ConfigError, match="more than the tower's vocab_size 100"):
        build_conch_text_tower(None, tokenizer_file, {**TINY, "vocab_size": 100})
    with pytest.raises(ConfigError, match="absent.bin' does not exist"):
        build_conch_text_tower(tmp_path / "absent.bin", tokenizer_file, TINY)


def test_train_config_builds_conch_prompts(checkpoint, tokenizer_file):
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(Path(__file__).resolve().parent.parent / "bundle" / "configs" / "train.json")
    parser.update({"text_arch": "conch", "text_weights": str(checkpoint[0]), "text_tokenizer": str(tokenizer_file),
                   "text_cfg": TINY, "text_n_ctx": 2})
    prompts = parser.get_parsed_content("train#text_prototypes")
    assert prompts.has_language_prior and prompts.ctx.shape == (2, TINY["width"])
    assert prompts().shape == (2, parser.get_parsed_content("embed_dim"))
