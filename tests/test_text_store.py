"""A text store's conditioning (ard/store/text.py, ard/text_encoders.py): each prompt encoded once, its valid tokens
only; read back as the encoder gave it; the null prompt at label `count`; resumable with identical bytes; covered by
the manifest's schema and sha256s."""
import json

import numpy as np
import pytest
import torch

from ard.conditioning import Prompt
from ard.store.schema import TextConditioning
from ard.store.text import FOLDER, PARTIAL, TextSidecar, encode_prompts
from ard.text_encoders import Encoded, HashEncoder

PROMPTS = [Prompt(str(i), f"a handwritten {word}") for i, word in
           enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine at the very end"])]


def test_a_masked_encoders_tokens_do_not_depend_on_the_batch():
    encoder = HashEncoder(dim=8)
    alone, mask, pooled = encoder.encode(["a handwritten one"])
    batch, batch_mask, _ = encoder.encode(["a handwritten one", "a much longer handwritten prompt here"])
    assert mask.sum() == 4 and torch.equal(batch[0][batch_mask[0]], alone[0][mask[0]]) and pooled is None
    with pytest.raises(ValueError, match="a prompt of 17 tokens; the hash encoder takes at most 16"):
        encoder.encode([" ".join(["w"] * 16)])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_encoded_prompts_read_back_as_encoded_valid_tokens_only(tmp_path, dtype):
    encoder = HashEncoder(dim=8)
    section = encode_prompts(tmp_path, PROMPTS, encoder, dtype=dtype, chunk_size=3, batch_size=2)
    TextConditioning.model_validate(section)  # the manifest's schema
    lengths = [encoder.count_tokens(p.text) for p in PROMPTS] + [1]  # the null prompt "" is its end token
    assert section["embeddings"]["shape"] == [sum(lengths), 8]
    itemsize = 4 if dtype == "float32" else 2
    shards = section["embeddings"]["shards"]
    assert section["embeddings"]["prompts_per_shard"] == 3 and len(shards) == 4  # 10 prompts + the null prompt
    assert [s["bytes"] for s in shards] == [128 + sum(lengths[j:j + 3]) * 8 * itemsize for j in range(0, 11, 3)]
    sidecar = TextSidecar(tmp_path, section)
    labels = torch.tensor([7, 0, 9, 10])  # 10: the null prompt
    got = sidecar.condition(labels)
    want, mask, _ = encoder.encode([PROMPTS[7].text, PROMPTS[0].text, PROMPTS[9].text, ""])
    assert torch.equal(got.mask, mask)
    tolerance = 0 if dtype == "float32" else 1e-2
    torch.testing.assert_close(got.embeddings, want, rtol=tolerance, atol=tolerance)
    assert torch.equal(got.null.mask, torch.ones(1, 1, dtype=torch.bool))
    assert [json.loads(line)["text"] for line in (tmp_path / FOLDER / "prompts.jsonl").read_text().splitlines()] \
        == [p.text for p in PROMPTS]
    assert not (tmp_path / FOLDER / PARTIAL).exists()
    with pytest.raises(ValueError, match=r"prompt label 11 out of range \[0, 10\] \(10: the null prompt\)"):
        sidecar.condition(torch.tensor([11]))
    lengths_file = tmp_path / FOLDER / "lengths.npy"
    np.save(lengths_file, np.array(lengths[:-1]))
    with pytest.raises(ValueError, match="lengths.npy: 10 token counts; the manifest needs 11 \\(the prompts and"):
        TextSidecar(tmp_path, section)
    np.save(lengths_file, np.array(lengths[:-2] + [lengths[-2] + 1, lengths[-1]]))  # a count off its shard
    stored = lengths[9] + lengths[10]  # the last shard: prompt 9 and the null prompt
    with pytest.raises(ValueError, match=f"shard-000003.npy: {stored} tokens; lengths.npy gives its prompts 9..10 "
                                         f"{stored + 1}"):
        TextSidecar(tmp_path, section)


class Pooling(HashEncoder):
    """A hash encoder that also pools each prompt (the mean of its tokens), as SD3's encoder gives pooled embeddings."""

    def __init__(self):
        super().__init__(dim=8)
        self.pooled_dim = 8

    def encode(self, texts):
        emb, mask, _ = super().encode(texts)  # (B, T, D), (B, T)
        return Encoded(emb, mask, (emb * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True))  # ..., (B, D)


def test_pooled_embeddings_are_stored_once_per_prompt(tmp_path):
    encoder = Pooling()
    section = encode_prompts(tmp_path, PROMPTS, encoder, dtype="float32", chunk_size=3)
    TextConditioning.model_validate(section)
    assert section["pooled"]["file"] == "conditioning/pooled.npy" and section["pooled"]["shape"] == [11, 8]
    got = TextSidecar(tmp_path, section).condition(torch.tensor([7, 10]))  # 10: the null prompt
    want = encoder.encode([PROMPTS[7].text, ""]).pooled  # (2, 8)
    assert torch.equal(got.pooled, want) and torch.equal(got.null.pooled, want[1:])
    with pytest.raises(ValueError, match=r"pooled.shape=\[10, 8\]: 10 prompts and the null prompt need 11 rows"):
        TextConditioning.model_validate({**section, "pooled": {**section["pooled"], "shape": [10, 8]}})
    assert "pooled" not in encode_prompts(tmp_path / "hash", PROMPTS, HashEncoder(dim=8))  # no pooled: no file


@pytest.mark.parametrize("kind", [HashEncoder, Pooling])
def test_an_interrupted_encoding_resumes_to_the_same_bytes(tmp_path, monkeypatch, kind):
    encoder = kind() if kind is Pooling else kind(dim=8)
    whole = encode_prompts(tmp_path / "whole", PROMPTS, encoder, chunk_size=3)
    calls = []

    def dies_on_third_chunk(texts):
        calls.append(texts)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return kind.encode(encoder, texts)

    monkeypatch.setattr(encoder, "encode", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode_prompts(tmp_path / "resumed", PROMPTS, encoder, chunk_size=3)
    assert len(list((tmp_path / "resumed" / FOLDER / PARTIAL).glob("*.npz"))) == 2  # two chunks kept
    calls.clear()
    monkeypatch.setattr(encoder, "encode", lambda texts: calls.append(texts) or kind.encode(encoder, texts))
    resumed = encode_prompts(tmp_path / "resumed", PROMPTS, encoder, chunk_size=3)
    assert len(calls) == 2  # the two chunks missing, not the whole file again
    assert resumed == {**whole, "encoder": whole["encoder"]}
    names = ["prompts.jsonl", "lengths.npy"] + [f"embeddings/shard-{j:06d}.npy" for j in range(4)]
    for name in names + (["pooled.npy"] if kind is Pooling else []):
        assert (tmp_path / "whole" / FOLDER / name).read_bytes() == (tmp_path / "resumed" / FOLDER / name).read_bytes()


def test_a_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    encoder = HashEncoder(dim=8)
    monkeypatch.setattr(encoder, "encode", lambda texts: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        encode_prompts(tmp_path, PROMPTS, encoder, chunk_size=3)
    with pytest.raises(ValueError, match="an unfinished encoding with other settings"):
        encode_prompts(tmp_path, PROMPTS, HashEncoder(dim=8, seed=1), chunk_size=3)


class Unmasked(HashEncoder):
    """An encoder run without a mask (as SD3's T5): all of its max_tokens outputs belong to the prompt."""

    def __init__(self):
        super().__init__(dim=4, max_tokens=6)
        self.masked = False

    def encode(self, texts):
        emb = super().encode(texts).embeddings  # (B, T, D)
        return Encoded(torch.nn.functional.pad(emb, (0, 0, 0, 6 - emb.shape[1])),  # (B, 6, D)
                       torch.ones(len(texts), 6, dtype=torch.bool))


def test_an_unmasked_encoder_stores_every_token(tmp_path):
    section = encode_prompts(tmp_path, PROMPTS[:2], Unmasked())
    lengths = np.load(tmp_path / FOLDER / "lengths.npy")
    assert section["encoder"]["masked"] is False and lengths.tolist() == [6, 6, 6]


def make_tiny_t5(directory, texts: list[str], width: int = 16, tokenizer_directory=None):
    """A tiny random T5 encoder with a word-level tokenizer of the words of `texts`, made on the spot (no
    download), saved as a local directory the way a T5 checkpoint is: tokenizer files and model.safetensors (the
    tokenizer in `tokenizer_directory` where given: an SD3 snapshot's tokenizer_3 beside its text_encoder_3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for text in texts for w in text.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tokenizer_directory or directory)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
                   ).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"), [p.text for p in PROMPTS])


def test_a_t5_encoders_valid_tokens_do_not_depend_on_padding(tmp_path, tiny_t5):
    """PixArt reads T5's valid tokens only, so only they are stored: they must not depend on the batch's padding.
    The store records the encoder's weights' sha256 and reads back what it encoded."""
    from ard.conditioning import encoder_identity
    from ard.text_encoders import load_text_encoder

    encoder = load_text_encoder("t5", 16, str(tiny_t5), max_tokens=8)
    alone, mask, _ = encoder.encode(["a handwritten one"])
    batch, batch_mask, _ = encoder.encode(["a handwritten one", PROMPTS[9].text])
    assert mask.sum() == 4 and batch_mask[1].sum() == 8  # the words and the end token
    torch.testing.assert_close(batch[0][batch_mask[0]], alone[0][mask[0]], rtol=1e-5, atol=1e-6)
    section = encode_prompts(tmp_path, PROMPTS, encoder, dtype="float32", chunk_size=4)
    assert section["encoder"]["weights_sha256"] == encoder_identity(tiny_t5)
    got = TextSidecar(tmp_path, section).condition(torch.tensor([1, 9]))
    assert torch.equal(got.mask, batch_mask)
    torch.testing.assert_close(got.embeddings[got.mask], batch[batch_mask], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="16-wide text tokens; the teacher reads 32-wide ones"):
        load_text_encoder("t5", 32, str(tiny_t5))
    with pytest.raises(ValueError, match="text_encoder='t5' needs text_encoder_path"):
        load_text_encoder("t5", 16)
