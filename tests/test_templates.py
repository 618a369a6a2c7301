"""Chat templates: training rendering == inference prompt + answer + end-of-turn, token for token; system-prompt
conventions; the built-in formats render what transformers' apply_chat_template renders with the real templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from camelid.templates import IGNORE_INDEX, TEMPLATES, TemplateError, for_tokenizer, from_jinja, get_template
from camelid.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"

SPECIALS = ("<s>", "</s>", "<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<start_of_turn>",
            "<end_of_turn>")

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in a sentence."},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]
NO_SYSTEM = CONV[1:]
TOOLS = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": '{"name": "weather"}'},
         {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "It is 21 degrees."}]

# Well-known Jinja chat templates, as published in the models' tokenizer_config.json (reference strings only).
REFERENCE = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",  # noqa: E501
    # the generic ChatML template of the transformers chat-templating docs
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",  # noqa: E501
    # Qwen/Qwen2-7B-Instruct
    "qwen": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",  # noqa: E501
    # mistralai/Mistral-7B-Instruct-v0.2
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",  # noqa: E501
    # google/gemma-7b-it
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",  # noqa: E501
}
TOKENS = {"llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "chatml": ("", "<|im_end|>"),
          "qwen": ("", "<|im_end|>"), "gemma": ("<bos>", "<eos>"), "llama3": ("<|begin_of_text|>", "<|end_of_text|>")}
SYSTEMLESS = {"mistral", "gemma"}  # their reference templates reject a system message


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    """A small byte-level BPE that knows every special token the built-in templates write."""
    folder = tmp_path_factory.mktemp("bpe")
    text = " ".join(m["content"] for m in CONV) + " The quick brown fox jumps over the lazy dog. USER ASSISTANT\n"
    (folder / "corpus.txt").write_text(text * 20 + "### Instruction: Response: Below is an instruction.\n" * 20)
    return Tokenizer.train([folder / "corpus.txt"], vocab_size=400, special_tokens=SPECIALS, show_progress=False)


def _fixture_tokenizer(name: str) -> Tokenizer:
    if not (TOKENIZERS / name / "tokenizer.json").is_file():
        pytest.skip(f"fixture tokenizer {name} absent")
    return Tokenizer(TOKENIZERS / name)


def _hf_render(template: str, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_utils.render_jinja_template([messages], chat_template=template,
                                                   add_generation_prompt=add_generation_prompt,
                                                   bos_token=bos, eos_token=eos)
    return rendered[0]


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained labels."""
    runs, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_train_equals_inference(template, tok: Tokenizer, conv) -> None:
    ids, labels = template.encode_for_training(tok, conv)
    bos, eos = (tok.id_to_token(i) if i is not None else "" for i in (tok.bos_id, tok.eos_id))
    assert ids == tok.encode(template.render(conv, bos_token=bos, eos_token=eos), bos=False)
    answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    runs = _runs(labels)
    assert len(runs) == len(answers)  # one trained run per answer, nothing else trained
    stop_ids = set(template.stop_token_ids(tok))
    for i, (start, end) in zip(answers, runs):
        prompt = template.encode_prompt(tok, conv[:i])
        # the inference prompt is exactly the training tokens before the answer, and the answer follows it
        assert ids[:len(prompt)] == prompt and start == len(prompt)
        assert labels[start:end] == ids[start:end]
        answer = tok.decode(ids[start:end], skip_special_tokens=False)
        assert answer.strip().startswith(conv[i]["content"].strip())
        # it ends with the end-of-turn token generation stops on
        assert ids[end - 1] in stop_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_rendering_is_prompt_plus_answer_plus_end_of_turn(bpe, name):
    template = get_template(name)
    for conv in (CONV, NO_SYSTEM, NO_SYSTEM[:2], CONV[:3], TOOLS):
        _check_train_equals_inference(template, bpe, conv)


def test_tool_results_are_context_in_every_format(bpe):
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 21}<|eot_id|>" in \
        get_template("llama3").render(TOOLS)
    assert "<|im_start|>tool\n{\"temp\": 21}<|im_end|>" in get_template("chatml").render(TOOLS)
    assert "<start_of_turn>user\n{\"temp\": 21}<end_of_turn>" in get_template("gemma").render(TOOLS)
    for name in TEMPLATES:
        ids, labels = get_template(name).encode_for_training(bpe, TOOLS)
        trained = bpe.decode([i for i, x in zip(ids, labels) if x != IGNORE_INDEX], skip_special_tokens=False)
        assert "weather" in trained and "temp" not in trained


@pytest.mark.parametrize("tok_name, names", [("llama3", ["llama3"]),
                                             ("llama2", ["llama2", "mistral", "vicuna", "alpaca"]),
                                             ("mistral", ["llama2", "mistral", "vicuna", "alpaca"])])
def test_training_equals_inference_with_real_tokenizers(tok_name, names):
    tok = _fixture_tokenizer(tok_name)
    for name in names:
        for conv in (CONV, NO_SYSTEM):
            _check_train_equals_inference(get_template(name), tok, conv)


def test_system_prompt_conventions():
    sys_user = CONV[:2]
    assert get_template("llama2").render(sys_user, True) == \
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    assert get_template("mistral").render(sys_user, True) == \
        "<s>[INST] You are terse.\n\nWhat is the capital of France? [/INST]"
    assert get_template("gemma").render(sys_user, True) == ("<bos><start_of_turn>user\nYou are terse.\n\n"
                                                            "What is the capital of France?<end_of_turn>\n"
                                                            "<start_of_turn>model\n")
    assert get_template("llama3").render(sys_user, True).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>")
    # defaults when the conversation has none; a given system prompt replaces them
    assert get_template("vicuna").render(CONV[1:2], True) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is the capital of France? ASSISTANT:")
    assert get_template("vicuna").render(CONV[:3]) == \
        "<s>You are terse. USER: What is the capital of France? ASSISTANT: Paris.</s>"
    assert get_template("alpaca").render(CONV[1:3]) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.</s>\n\n")
    assert get_template("qwen").render(CONV[1:2]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert get_template("chatml").render(CONV[1:2]).startswith("<|im_start|>user\n")
    # folding needs a user turn
    with pytest.raises(TemplateError, match="no user turn"):
        get_template("llama2").render([CONV[0], CONV[2]])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_builtin_matches_reference_jinja_in_transformers(bpe, name):
    bos, eos = TOKENS[name]
    for conv in (NO_SYSTEM, NO_SYSTEM[:1], NO_SYSTEM[:3]) if name in SYSTEMLESS else (CONV, NO_SYSTEM, CONV[:4]):
        for agp in (False, True):
            expected = _hf_render(REFERENCE[name], conv, agp, bos, eos)
            assert get_template(name).render(conv, agp, bos, eos) == expected
            assert from_jinja(REFERENCE[name], bos, eos).render(conv, agp) == expected
    # the Jinja template, masked turn by turn, trains exactly what the built-in one does
    if name not in ("llama2", "mistral"):  # the bpe tokenizer's BOS/EOS are <s>/</s>, used by both
        tok = bpe
        conv = NO_SYSTEM if name in SYSTEMLESS else CONV
        assert from_jinja(REFERENCE[name], *TOKENS[name]).encode_for_training(tok, conv) == \
            get_template(name).encode_for_training(tok, conv)


@pytest.mark.parametrize("name", ["llama2", "mistral"])
def test_jinja_masks_match_builtin_with_sentencepiece(name):
    tok = _fixture_tokenizer("llama2")
    conv = NO_SYSTEM if name in SYSTEMLESS else CONV
    assert from_jinja(REFERENCE[name], "<s>", "</s>").encode_for_training(tok, conv) == \
        get_template(name).encode_for_training(tok, conv)


def test_llama3_matches_the_real_chat_template():
    tok = _fixture_tokenizer("llama3")
    if not tok.chat_template:
        pytest.skip("fixture has no chat_template")
    hdr = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ours = get_template("llama3")
    for conv in (CONV, NO_SYSTEM, CONV[:2], [{"role": "user", "content": "  padded  \n"}]):
        expected = _hf_render(tok.chat_template, conv, True, "<|begin_of_text|>", "<|end_of_text|>")
        # this copy of the template always appends the assistant header
        assert ours.render(conv, True) == expected
        assert ours.render(conv, False) + hdr == expected
        jinja = for_tokenizer(tok)
        assert jinja.render(conv, True) == expected
    jinja = for_tokenizer(tok)
    ids, labels = ours.encode_for_training(tok, CONV)
    jids, jlabels = jinja.encode_for_training(tok, CONV)
    assert jids[:len(ids)] == ids and jlabels[:len(ids)] == labels and set(jlabels[len(ids):]) == {IGNORE_INDEX}
    assert jinja.encode_prompt(tok, CONV[:3]) == ours.encode_prompt(tok, CONV[:3])
    eot = tok.token_to_id("<|eot_id|>")
    assert eot in ours.stop_token_ids(tok) and tok.eos_id in ours.stop_token_ids(tok)
    assert jinja.stop_token_ids(tok) == ours.stop_token_ids(tok)


def test_mistral_fixture_uses_builtin_when_it_has_no_template():
    tok = _fixture_tokenizer("mistral")
    if tok.chat_template:
        assert from_jinja(tok.chat_template, "<s>", "</s>").render(NO_SYSTEM) == \
            get_template("mistral").render(NO_SYSTEM)
    else:
        with pytest.raises(TemplateError, match="no chat_template"):
            for_tokenizer(tok)
        assert for_tokenizer(tok, "mistral") is get_template("mistral")


def test_jinja_environment_matches_transformers():
    # trim_blocks / lstrip_blocks, loopcontrols, tojson without HTML escaping, namespace, strftime_now
    template = ("{% set ns = namespace(n=0) %}\n"
                "{% for m in messages %}\n"
                "    {% if loop.index0 > 1 %}{% break %}{% endif %}\n"
                "    {% set ns.n = ns.n + 1 %}\n"
                "[{{ m.role }}] {{ m.content | tojson }}\n"
                "{% endfor %}\n"
                "n={{ ns.n }} year={{ strftime_now('%Y')|length }}{{ eos_token }}")
    msgs = [{"role": "user", "content": "<b>&</b> é"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "never shown"}]
    assert from_jinja(template, "<s>", "</s>").render(msgs) == _hf_render(template, msgs, False, "<s>", "</s>")
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateError, match="roles must alternate"):
        from_jinja(failing).render(msgs)
    # {% generation %} (transformers' assistant-mask marker) renders its body
    gen = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}" \
          "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    assert from_jinja(gen).render(msgs[:2]) == "<b>&</b> éok"
    # the sandbox holds
    with pytest.raises(TemplateError, match="unsafe"):
        from_jinja("{{ messages.__class__.__mro__ }}").render(msgs)


def test_chatml_jinja_trains_end_of_turn_but_not_the_newline_after_it(bpe):
    ids, labels = from_jinja(REFERENCE["chatml"]).encode_for_training(bpe, NO_SYSTEM[:2])
    trained = [i for i, x in zip(ids, labels) if x != IGNORE_INDEX]
    assert bpe.decode(trained, skip_special_tokens=False) == "Paris.<|im_end|>"
    assert ids[-1] != trained[-1]  # the "\n" after <|im_end|> is context


def test_train_on_all_and_stop_strings(bpe):
    t = get_template("chatml")
    ids, labels = t.encode_for_training(bpe, CONV, train_on_all=True)
    assert labels == ids
    assert t.stop_strings == ("<|im_end|>",)
    assert bpe.token_to_id("<|im_end|>") in t.stop_token_ids(bpe)
    assert get_template("alpaca").stop_strings == ("{eos}", "### Instruction:")
    assert bpe.eos_id in get_template("alpaca").stop_token_ids(bpe)


def test_braces_in_messages_stay_as_written():
    conv = [{"role": "system", "content": "{content} {eos}"}, {"role": "user", "content": "{system} {bos}"},
            {"role": "assistant", "content": "{content}"}]
    assert get_template("llama2").render(conv) == \
        "<s>[INST] <<SYS>>\n{content} {eos}\n<</SYS>>\n\n{system} {bos} [/INST] {content} </s>"


def test_errors(tmp_path):
    with pytest.raises(TemplateError, match="unknown chat template 'nope'"):
        get_template("nope")
    with pytest.raises(TemplateError, match="role 'robot'"):
        get_template("chatml").render([{"role": "robot", "content": "x"}])
    (tmp_path / "corpus.txt").write_text("Weather in Paris? What is the capital of France?\n" * 20)
    tok = Tokenizer.train([tmp_path / "corpus.txt"], 300, special_tokens=("<s>", "</s>", "<pad>"), show_progress=False)
    with pytest.raises(TemplateError, match=r"<\|start_header_id\|>.*does not have"):
        get_template("llama3").encode_prompt(tok, NO_SYSTEM[:1])
    with pytest.raises(TemplateError, match=r"<\|im_end\|>.*is it this model's tokenizer"):
        from_jinja(REFERENCE["chatml"]).encode_for_training(tok, NO_SYSTEM)


def test_jinja_refusals_are_template_errors():
    """A model's template that refuses a conversation (Gemma's raise_exception on a system role) or reads what is
    not there is a TemplateError, which the CLI prints as one line and the server answers with a 400."""
    refuses = from_jinja("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert refuses.render(NO_SYSTEM) == "".join(m["content"] for m in NO_SYSTEM)
    with pytest.raises(TemplateError, match="System role not supported"):
        refuses.render([{"role": "system", "content": "s"}, *NO_SYSTEM])
    with pytest.raises(TemplateError, match="'dict object' has no attribute 'nope'"):
        from_jinja("{{ messages[0].nope.deeper }}").render(NO_SYSTEM)
    with pytest.raises(TemplateError, match="not valid Jinja"):
        from_jinja("{% if %}")


def test_jinja2_is_optional(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jinja(name, *args, **kwargs):
        if name.startswith("jinja2"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jinja)
    with pytest.raises(ImportError, match="pip install 'jinja2"):
        from_jinja("{{ 1 }}")
    assert get_template("llama3").render(NO_SYSTEM)  # built-in templates need no jinja2


def test_fixture_config_is_what_we_test_against():
    cfg = TOKENIZERS / "llama3" / "tokenizer_config.json"
    if not cfg.is_file():
        pytest.skip("fixture absent")
    assert "<|start_header_id|>" in json.loads(cfg.read_text())["chat_template"]


def _hf_tokenizer(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_tokens_and_masks_match_transformers(bpe, tmp_path):
    # transformers' own assistant mask ({% generation %} around answer + <|im_end|>) == our labels, token for token
    bpe.save(tmp_path)
    hf = _hf_tokenizer(tmp_path)
    marked = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    for conv in (CONV, TOOLS):
        out = hf.apply_chat_template(conv, chat_template=marked, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, labels = get_template("chatml").encode_for_training(bpe, conv)
        assert list(out["input_ids"]) == ids
        assert list(out["assistant_masks"]) == [int(x != IGNORE_INDEX) for x in labels]
        prompt = hf.apply_chat_template(conv[:-1], chat_template=REFERENCE["chatml"], tokenize=True,
                                        return_dict=True, add_generation_prompt=True)["input_ids"]
        assert list(prompt) == get_template("chatml").encode_prompt(bpe, conv[:-1])


def test_llama3_prompt_tokens_match_transformers():
    tok = _fixture_tokenizer("llama3")
    hf = _hf_tokenizer(TOKENIZERS / "llama3")
    for conv in (CONV[:4], NO_SYSTEM[:1]):
        expected = hf.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
        assert list(expected["input_ids"]) == get_template("llama3").encode_prompt(tok, conv)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"template": 3}'])
def test_a_damaged_recorded_template_file_is_one_error_naming_it(tmp_path, text):
    """camelid_template.json unreadable: JSON's own message without the file, or an AttributeError traceback."""
    from camelid.templates import TEMPLATE_FILE, recorded_template

    (tmp_path / TEMPLATE_FILE).write_text(text)
    with pytest.raises(TemplateError, match=TEMPLATE_FILE):
        recorded_template(tmp_path)
