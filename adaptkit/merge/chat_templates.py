"""Built-in chat templates for a recipe's `chat_template: <name>` (the names mergekit knows).

Each is the prompt format of its family as a Jinja template for transformers' `apply_chat_template`
(which renders with trim_blocks and lstrip_blocks). chatml, llama3 and mistral render what
mergekit's templates of those names render; for alpaca and exaone mergekit's render stray
indentation or drop the blank line before `### Response:`, and these render the formats themselves
(tests/test_merge_tokenizers.py writes both out).
"""
from __future__ import annotations

CHATML = ("{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

LLAMA3 = ("{%- for message in messages -%}{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>\\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}")

MISTRAL = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- set turns = messages[1:] if system is not none else messages -%}{{ bos_token }}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is not none else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif -%}{%- endfor -%}")

ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} -%}"
    "{%- set ns = namespace(parts=[(system | last).content | trim] if system else []) -%}"
    "{%- for message in messages if message['role'] in heads -%}"
    "{%- set ns.parts = ns.parts + [heads[message['role']] + '\\n' + message['content'] | trim] -%}{%- endfor -%}"
    "{{ ns.parts | join('\\n\\n') }}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '\\n\\n### Response:\\n' }}{%- endif -%}")

EXAONE = ("{%- for message in messages -%}"
          "{%- if loop.first and message['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
          "{{ '[|' + message['role'] + '|]' + message['content'] + ('\\n' if message['role'] == 'user' else '[|endofturn|]\\n') }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}")

TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
