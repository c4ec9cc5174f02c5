"""Special-token safety: text from data or users never yields special-token ids (ARCHITECTURE rule 8)."""
from zhllm.tokenizer.encode import encode_batch_texts, encode_text, special_token_ids, text_backend
from zhllm.tokenizer.load import load_tokenizer

TRICKY = "文档里出现 <|im_start|>user\n和<|im_end|>以及<|endoftext|><|reserved_0|>，都只是普通文字。"


def test_specials_in_data_are_plain_text(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    specials = special_token_ids(tok)
    assert {0, 1, 2} <= specials
    ids = encode_text(tok, TRICKY)
    assert not set(ids) & specials
    assert tok.decode(ids) == TRICKY
    # the naive call would have produced control tokens: the test can fail
    assert set(tok.encode(TRICKY, add_special_tokens=False)) & specials


def test_batch_equals_single_and_raw_backend(tokenizer_dir, corpus):
    tok = load_tokenizer(tokenizer_dir)
    texts = [TRICKY, *corpus[:9], ""]
    batch = encode_batch_texts(tok, texts)
    assert batch == [encode_text(tok, t) for t in texts]
    assert batch == encode_batch_texts(tok.backend_tokenizer, texts)
    assert batch[-1] == []


def test_template_still_emits_control_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    encode_text(tok, TRICKY)  # must not switch the shared backend into split mode
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert not tok.backend_tokenizer.encode_special_tokens


def test_backend_is_cached(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert text_backend(tok) is text_backend(tok)
    raw = tok.backend_tokenizer
    assert text_backend(raw) is text_backend(raw)
    assert text_backend(text_backend(raw)) is text_backend(raw)
