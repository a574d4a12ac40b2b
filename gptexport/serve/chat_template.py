"""Chat templates: a conversation (OpenAI's `messages`) -> the one prompt text the model continues.

A template is Jinja2, as Hugging Face's tokenizers write `chat_template`: it sees `messages` (each
with `role`, `content` and an optional `name`) and `add_generation_prompt`, and is rendered in a
sandbox (no attribute access to Python internals), with trim_blocks and lstrip_blocks as
transformers renders it. `gptexport triton --chat-template FILE|NAME` copies it into the
repository beside config.pbtxt; without one the model has no chat endpoint (a plain language
model has no notion of turns: guessing a format would make text it was never trained on).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenizerError, UsageError

TEMPLATE_FILE = "chat_template.jinja"  # REPO/NAME/chat_template.jinja

# Fits the 65-character Shakespeare vocabulary (letters, digits 3, space, newline, !$&',-.:;?):
# each message as a speaker's line as in the training text ("ROMEO:\nWhat light...\n\n"); the
# user speaks as the message's name or ROMEO, the assistant as JULIET, a system message as a
# plain paragraph. Stop at "\n\n" to get one speech back.
SHAKESPEARE = """\
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ message['content'] }}

{% else -%}
{{ message['name'] if message.get('name') else ('JULIET' if message['role'] == 'assistant' else 'ROMEO') }}:
{{ message['content'] }}

{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
JULIET:
{% endif -%}
"""
SHIPPED = {"shakespeare": SHAKESPEARE}


def template_source(file_or_name: str) -> str:
    """The template text of a file, or of a shipped template by name; checked to compile."""
    path = Path(file_or_name)
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--chat-template {path}: cannot read it ({e})") from None
    elif file_or_name in SHIPPED:
        source = SHIPPED[file_or_name]
    else:
        raise UsageError(f"--chat-template {file_or_name}: no such file, nor a shipped template "
                         f"(shipped: {', '.join(SHIPPED)})")
    compile_template(source, f"--chat-template {file_or_name}")
    return source


def compile_template(source: str, where: str):
    """A Jinja2 template in a sandbox; UsageError naming `where` if it does not parse."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise UsageError(f"{where}: not a Jinja2 template (line {e.lineno}: {e.message})") from None


def check_fits(source: str, tokenizer, where: str) -> None:
    """The template's own text (around empty messages) must encode with the model's tokenizer: a
    template the model cannot read is refused when the repository is written, not at every request."""
    if tokenizer is None:
        raise UsageError(f"--chat-template {where}: the model has no tokenizer, and chat is text")
    roles = ("system", "user", "assistant")
    text = render(compile_template(source, f"--chat-template {where}"), [{"role": r, "content": ""} for r in roles])
    try:
        tokenizer.encode(text)
    except TokenizerError as e:
        raise UsageError(f"--chat-template {where}: its text does not fit the model's tokenizer ({e})") from None


def write_template(source: str, model_folder: Path) -> None:
    (model_folder / TEMPLATE_FILE).write_text(source, encoding="utf-8")


def load_template(model_folder: Path):
    """The compiled template of a repository's model, or None where it has none."""
    path = model_folder / TEMPLATE_FILE
    if not path.is_file():
        return None
    return compile_template(path.read_text(encoding="utf-8"), str(path))


def render(template, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt of a conversation; UsageError for a template that fails on these messages."""
    from jinja2 import TemplateError

    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="", eos_token="")
    except TemplateError as e:
        raise UsageError(f"messages: the chat template failed on them ({e})") from None
