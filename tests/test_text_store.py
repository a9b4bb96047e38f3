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
from ard.text_encoders import HashEncoder

PROMPTS = [Prompt(str(i), f"a handwritten {word}") for i, word in
           enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine at the very end"])]


def test_a_masked_encoders_tokens_do_not_depend_on_the_batch():
    encoder = HashEncoder(dim=8)
    alone, mask = encoder.encode(["a handwritten one"])
    batch, batch_mask = encoder.encode(["a handwritten one", "a much longer handwritten prompt here"])
    assert mask.sum() == 4 and torch.equal(batch[0][batch_mask[0]], alone[0][mask[0]])
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
    assert section["embeddings"]["bytes"] == 128 + sum(lengths) * 8 * itemsize  # the .npy header + valid tokens
    sidecar = TextSidecar(tmp_path, section)
    labels = torch.tensor([7, 0, 9, 10])  # 10: the null prompt
    got = sidecar.condition(labels)
    want, mask = encoder.encode([PROMPTS[7].text, PROMPTS[0].text, PROMPTS[9].text, ""])
    assert torch.equal(got.mask, mask)
    tolerance = 0 if dtype == "float32" else 1e-2
    torch.testing.assert_close(got.embeddings, want, rtol=tolerance, atol=tolerance)
    assert torch.equal(got.null.mask, torch.ones(1, 1, dtype=torch.bool))
    assert [json.loads(line)["text"] for line in (tmp_path / FOLDER / "prompts.jsonl").read_text().splitlines()] \
        == [p.text for p in PROMPTS]
    assert not (tmp_path / FOLDER / PARTIAL).exists()
    with pytest.raises(ValueError, match=r"prompt label 11 out of range \[0, 10\] \(10: the null prompt\)"):
        sidecar.condition(torch.tensor([11]))
    np.save(tmp_path / FOLDER / "lengths.npy", np.load(tmp_path / FOLDER / "lengths.npy")[:-1])
    with pytest.raises(ValueError, match="lengths.npy: 10 token counts .* needs 11 \\(the prompts and the null"):
        TextSidecar(tmp_path, section)


def test_an_interrupted_encoding_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    encoder = HashEncoder(dim=8)
    whole = encode_prompts(tmp_path / "whole", PROMPTS, encoder, chunk_size=3)
    calls = []

    def dies_on_third_chunk(texts):
        calls.append(texts)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return HashEncoder.encode(encoder, texts)

    monkeypatch.setattr(encoder, "encode", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode_prompts(tmp_path / "resumed", PROMPTS, encoder, chunk_size=3)
    assert len(list((tmp_path / "resumed" / FOLDER / PARTIAL).glob("*.npz"))) == 2  # two chunks kept
    calls.clear()
    monkeypatch.setattr(encoder, "encode", lambda texts: calls.append(texts) or HashEncoder.encode(encoder, texts))
    resumed = encode_prompts(tmp_path / "resumed", PROMPTS, encoder, chunk_size=3)
    assert len(calls) == 2  # the two chunks missing, not the whole file again
    assert resumed == {**whole, "encoder": whole["encoder"]}
    for name in ("prompts.jsonl", "embeddings.npy", "lengths.npy"):
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
        emb, _ = super().encode(texts)  # (B, T, D)
        return torch.nn.functional.pad(emb, (0, 0, 0, 6 - emb.shape[1])), torch.ones(len(texts), 6, dtype=torch.bool)


def test_an_unmasked_encoder_stores_every_token(tmp_path):
    section = encode_prompts(tmp_path, PROMPTS[:2], Unmasked())
    lengths = np.load(tmp_path / FOLDER / "lengths.npy")
    assert section["encoder"]["masked"] is False and lengths.tolist() == [6, 6, 6]
