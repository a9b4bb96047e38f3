"""A tiny random CLIP (transformers CLIPModel + CLIPProcessor with a word-level tokenizer), made on the spot: the
CLIP score's tests run without downloads."""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, CLIPImageProcessor, CLIPProcessor, PreTrainedTokenizerFast


def clip_tokenizer(texts, max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the words of `texts` in CLIP's layout (start and end tokens, padded with the end
    token) that pads and cuts to `max_length` (its model_max_length)."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<|startoftext|>", "<|endoftext|>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)


def make_tiny_clip(directory, texts):
    fast = clip_tokenizer(texts)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=fast).save_pretrained(directory)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(fast), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                         eos_token_id=2),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(directory)
    return directory
