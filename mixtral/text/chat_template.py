"""The Mixtral-Instruct (Mistral v1) chat format as a Jinja template, for transformers, vLLM and llama.cpp.

`CHAT_TEMPLATE` renders what `mixtral.text.chat.format_chat_text` renders: BOS, then per user turn
`[INST] {content} [/INST]`, per assistant turn ` {content}` and EOS, the leading system messages
joined with "\\n\\n" (empty ones dropped) and prepended to the FIRST user message, roles alternating
from user. Tokenized as one string by a tokenizer that parses `<s>`/`</s>` as control tokens (each
text segment between them gets SentencePiece's leading "▁", as when mistral-common encodes the
segments one by one), it gives mistral-common's ids; tests/parity/test_chat_template.py checks that
through transformers' `apply_chat_template`. Written into tokenizer_config.json (`chat_template`)
and GGUF (`tokenizer.chat_template`) by every checkpoint writer here.
"""

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', turns=0) -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.turns > 0 -%}{{- raise_exception('a system message must precede all user messages') -}}{%- endif -%}"
    "{%- if message['content'] -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.turns % 2 == 1 -%}{{- raise_exception('roles must alternate user/assistant') -}}{%- endif -%}"
    "{%- if ns.turns == 0 and ns.system -%}"
    "{{- '[INST] ' + ns.system + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.turns % 2 == 0 -%}{{- raise_exception('roles must alternate user/assistant') -}}{%- endif -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- else -%}"
    "{{- raise_exception('roles are system, user and assistant; got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
