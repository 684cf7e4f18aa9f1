"""The chat format every chatpipe model speaks: ChatML turns, with generation markers.

    <|im_start|>user
    How far is the moon?<|im_end|>
    <|im_start|>assistant
    About 384,000 km.<|im_end|>

`<|im_end|>` is the tokenizer's EOS: it ends a document in pretraining and a reply in chat, so a
sampled reply stops where a trained one did. `<|pad|>` is a separate token (PPO needs padding
that is never mistaken for EOS). The template wraps each assistant reply, its `<|im_end|>`
included, in `{% generation %}` markers, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` tells SFT which tokens carry the loss.
"""

PAD_TOKEN = "<|pad|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, TURN_START, TURN_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
