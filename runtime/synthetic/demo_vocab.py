"""The tokenizer the project's demo models carry: a small byte-level BPE laid out like Kimi K2's vocab.

No real Kimi vocabulary can be downloaded here, so demo models get a BPE trained (deterministically) on
the small corpus below, pre-split exactly as llama.cpp splits kimi-k2 text, then Kimi's special tokens
at Kimi's offsets. Id layout, as in a real Kimi GGUF but with ~2,600 ranks instead of 163,584:

    0 .. n_ranks-1                  BPE ranks (all 256 bytes first), NORMAL
    n_ranks + SPECIAL_OFFSETS[t]    Kimi special token t, CONTROL
    every other id up to +255       filler "[PAD{id}]", UNUSED
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from gguf import GGUFWriter, TokenType
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from ..tokenizer import KIMI_K2_PATTERN, byte_to_unicode

MAX_RANKS = 3000  # the corpus runs out of pairs first (~2,600 ranks)
NUM_SPECIAL_SLOTS = 256
# Offsets from the first id after the BPE ranks; real Kimi: [BOS] = 163584.
SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20, "<|media_pad|>": 21,
    "<think>": 22, "</think>": 23, "[UNK]": 254, "[PAD]": 255,
}

# moonshotai/Kimi-K2-Instruct's chat template (as in llama.cpp models/templates/Kimi-K2-Instruct.jinja).
KIMI_K2_INSTRUCT_TEMPLATE = """\
{% macro render_content(msg) -%}
    {%- set c = msg.get('content') -%}
    {%- if c is string -%}
      {{ c }}
    {%- elif c is not none -%}
      {% for content in c -%}
        {% if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
          <|media_start|>image<|media_content|><|media_pad|><|media_end|>
        {% else -%}
          {{ content['text'] }}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
{%- endmacro %}

{%- set tool_response_queue = namespace(ids=[]) -%}
{%- set tool_call_counter = namespace(value=1) -%}

{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{% for message in messages %}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {% endif %}

  {%- set role_name =  message.get('name') or  message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{role_name}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{role_name}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{role_name}}<|im_middle|>
  {%- endif -%}

  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{render_content(message)}}<|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      {%- if tool_call['id'] is defined -%}
        {%- set formatted_id = tool_call['id'] -%}
      {%- else -%}
        {%- set formatted_id = 'functions.' + tool_call['function']['name'] + ':' + (tool_call_counter.value | string) -%}
        {%- set tool_call_counter.value = tool_call_counter.value + 1 -%}
      {%- endif -%}
      {%- set _ = tool_response_queue.ids.append(formatted_id) -%}
      <|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    {%- if tool_response_queue.ids -%}
      {%- set tool_call_id = tool_response_queue.ids.pop(0) -%}
    {%- else -%}
      {%- set tool_call_id = 'functions.' + message.get('name', 'unknown') + ':' + (tool_call_counter.value | string) -%}
    {%- endif -%}
    ## Return of {{ tool_call_id }}
{{render_content(message)}}
  {%- elif message['content'] is not none -%}
    {{render_content(message)}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

# moonshotai/Kimi-K2-Thinking's template: earlier assistant turns get an empty <think></think>, the turns
# after the last plain assistant answer keep their reasoning_content inside <think>...</think>.
KIMI_K2_THINKING_TEMPLATE = """\
{%- macro render_content(msg) -%}
    {%- set c = msg.get('content') -%}
    {%- if c is string -%}
      {{ c }}
    {%- elif c is not none -%}
      {% for content in c -%}
        {% if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
          <|media_start|>image<|media_content|><|media_pad|><|media_end|>
        {% else -%}
          {{ content['text'] }}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}

{% macro set_roles(message) -%}
  {%- set role_name =  message.get('name') or  message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{role_name}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{role_name}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{role_name}}<|im_middle|>
  {%- endif -%}
{%- endmacro -%}

{%- set tool_response_queue = namespace(ids=[]) -%}
{%- set tool_call_counter = namespace(value=0) -%}

{%- macro render_toolcalls(message) -%}
  <|tool_calls_section_begin|>
  {%- for tool_call in message['tool_calls'] -%}
    {%- if tool_call['id'] is defined -%}
      {%- set formatted_id = tool_call['id'] -%}
    {%- else -%}
      {%- set formatted_id = 'functions.' + tool_call['function']['name'] + ':' + (tool_call_counter.value | string) -%}
      {%- set tool_call_counter.value = tool_call_counter.value + 1 -%}
    {%- endif -%}
    {%- set _ = tool_response_queue.ids.append(formatted_id) -%}
    <|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
  {%- endfor -%}
  <|tool_calls_section_end|>
{%- endmacro -%}


{# Find last non-tool-call assisitant message #}
{%- set ns = namespace(last_non_tool_call_assistant_msg=-1) -%}
{%- for idx in range(messages|length-1, -1, -1) -%}
    {%- if messages[idx]['role'] == 'assistant' and not messages[idx].get('tool_calls') -%}
        {%- set ns.last_non_tool_call_assistant_msg = idx -%}
    {%- endif -%}
{%- endfor -%}

{# split all messages into history & suffix, reasoning_content in suffix should be reserved.#}
{%- set hist_msgs = messages[:ns.last_non_tool_call_assistant_msg+1] -%}
{%- set suffix_msgs = messages[ns.last_non_tool_call_assistant_msg+1:] -%}

{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}

{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}

{%- for message in hist_msgs -%}
  {{set_roles(message)}}
  {%- if message['role'] == 'assistant' -%}
    <think></think>{{render_content(message)}}
    {%- if message.get('tool_calls') -%}
      {{render_toolcalls(message)}}
    {%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    {%- if tool_response_queue.ids -%}
      {%- set tool_call_id = tool_response_queue.ids.pop(0) -%}
    {%- else -%}
      {%- set tool_call_id = 'functions.' + message.get('name', 'unknown') + ':' + (tool_call_counter.value | string) -%}
    {%- endif -%}
    ## Return of {{ tool_call_id }}
{{render_content(message)}}
  {%- elif message['content'] is not none -%}
    {{render_content(message)}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}

{%- for message in suffix_msgs -%}
  {{set_roles(message)}}
  {%- if message['role'] == 'assistant' -%}
    {%- set rc = message.get('reasoning_content', '') -%}
    <think>{{rc}}</think>{{render_content(message)}}
    {%- if message.get('tool_calls') -%}
     {{render_toolcalls(message)}}
    {%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    {%- if tool_response_queue.ids -%}
      {%- set tool_call_id = tool_response_queue.ids.pop(0) -%}
    {%- else -%}
      {%- set tool_call_id = 'functions.' + message.get('name', 'unknown') + ':' + (tool_call_counter.value | string) -%}
    {%- endif -%}
    ## Return of {{ tool_call_id }}
{{render_content(message)}}
  {%- elif message['content'] is not none -%}
    {{render_content(message)}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}


{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""
CHAT_TEMPLATES = {"instruct": KIMI_K2_INSTRUCT_TEMPLATE, "thinking": KIMI_K2_THINKING_TEMPLATE}

# Training text: prose, code, numbers, Chinese and emoji, so every kind of merge occurs.
CORPUS = """\
The river town woke slowly. Fishermen dragged their boats onto the gravel, and the baker's daughter
carried trays of bread across the square before the church bell rang seven. Nobody hurried; the morning
belonged to the gulls, the smell of tar, and the quiet argument between two old men about the weather.
"It'll rain by noon," said one. "You've said that every day since March," said the other, "and I'm
still waiting." They laughed, and the café owner brought them coffee without being asked.

Scientists have long wondered why some birds migrate thousands of kilometres while their close relatives
stay at home. A recent study followed 412 warblers fitted with tiny trackers weighing under 0.6 grams.
The results were surprising: young birds that had never flown the route before chose almost the same
path as the adults, crossing the Mediterranean at its narrowest point. The researchers don't yet know
whether the map is inherited, learned from the stars, or read from the Earth's magnetic field.

Good software is written twice: once to understand the problem, and once to solve it. The first draft
teaches you which abstractions matter; the second keeps only those. We'll refactor the parser, rename
the confusing helpers, and delete whatever isn't tested. I'd rather ship less code that works than more
code that might. They're planning a release on Friday, so we've got three days.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class TokenCounter:
    def __init__(self, vocab_size: int = 163840):
        self.vocab_size = vocab_size
        self.counts: dict[int, int] = {}

    def update(self, token_ids):
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} out of range")
            self.counts[token_id] = self.counts.get(token_id, 0) + 1
        return self

    def most_common(self, k=10):
        return sorted(self.counts.items(), key=lambda kv: -kv[1])[:k]


if __name__ == "__main__":
    counter = TokenCounter()
    print(counter.update([1, 2, 2, 3, 3, 3]).most_common(2))
    for i, value in enumerate(fibonacci(12)):
        print(f"{i:>2}: {value}")

import numpy as np
x = np.zeros((4, 7168), dtype=np.float32)  # [T, D]
scores = x @ np.ones((7168, 384), dtype=np.float32)  # [T, E]
top_k = np.argsort(-scores, axis=-1)[:, :8]
HTTPServer, JSONDecoder, getElementById, parseInt, XMLHttpRequest, camelCaseName, snake_case_name

Invoice 2024-07-15: 3 items at $19.99, 12 items at $4.50, shipping 7.25 EUR, total 2,134,567.89.
Call +1 (415) 555-0132 or 020 7946 0958 before 09:30. Pi is 3.14159265358979, e is 2.718281828.
Version 1.10.3 was released on 2025/01/31; build 98765 passed 1024 of 1024 tests in 37.5 seconds.
The population grew from 1,380,000,000 to 1,412,000,000 while 0.5% of 8000000000 is 40000000.

今天天气很好，我们一起去公园散步吧。公园里有很多人，有的在跑步，有的在下棋，还有的在唱歌。
人工智能正在改变我们的生活方式。大型语言模型可以回答问题、翻译文本、编写代码，还能帮助学生学习。
我喜欢读书，尤其是历史和科学方面的书。学习中文需要时间，但是每天练习就会进步。
北京是中国的首都，上海是最大的城市。这个模型有一万亿个参数，其中每个词元只激活三百二十亿个。
请把这段文字翻译成英文：你好，世界！明天见。数字：一二三四五六七八九十，2025年1月1日。
混合文本：我在用Python写一个tokenizer，它支持UTF-8编码和emoji表情😀。Kimi是月之暗面开发的模型。

Great job today! 🎉🎉 The demo worked 👍 and everyone was happy 😀😃😄. Weather: ☀️ then 🌧️, later ⛈️.
Family: 👨‍👩‍👧‍👦 and 👩‍❤️‍👨, people: 👋🏽 👍🏿 🧑‍💻 🏳️‍🌈 🇯🇵 🇺🇸 🇨🇳. Food: 🍕🍣🍜☕ ❤️❤️❤️ 🔥🔥 ✅ ❌ ⭐⭐⭐.
I ❤️ coding 💻 late at night 🌙 with tea 🍵. 中文和表情一起用也很常见😂😂，好的👌。

The lighthouse keeper kept a notebook for forty years. Each entry was short: the wind, the sea, the
ships that passed, and sometimes a line about his wife's garden. When the light was automated in 1987,
he walked down the spiral stairs for the last time, locked the door, and posted the key to the coast
guard with a note that said only: "She's all yours. Mind the third step; it's loose." Historians later
found the notebooks in an attic, and they've become a small treasure for anyone studying the climate of
the northern coast, because his measurements were careful, regular, and honest.

Cooking is mostly patience. Slice two onions thinly, warm a spoon of butter with a splash of olive oil,
and let the onions soften over low heat for thirty minutes, stirring now and then. Add a pinch of salt,
a bay leaf, and a glass of dry white wine; let it bubble away. Pour in a litre of stock, simmer for
twenty minutes, then toast thick slices of bread, cover them with grated cheese, and grill until golden.
Don't rush the onions: if they burn, you'll taste it, and there's no way to hide it afterwards.

Questions people often ask: What happens when the model runs out of memory? Why does quantization
change the answers slightly? How many experts are active for each token? The short answers are: it
offloads experts to other machines, rounding errors accumulate across sixty-one layers, and eight of
three hundred and eighty-four experts, plus one shared expert, are used for every single token.

async def fetch_all(urls: list[str], limit: int = 8) -> dict[str, bytes]:
    semaphore = asyncio.Semaphore(limit)
    results: dict[str, bytes] = {}

    async def fetch(url: str) -> None:
        async with semaphore:
            response = await client.get(url, timeout=30.0)
            response.raise_for_status()
            results[url] = response.content

    await asyncio.gather(*(fetch(url) for url in urls))
    return results


@dataclass(frozen=True)
class ExpertPlacement:
    layer: int
    expert: int
    node: str
    bytes_on_disk: int = 0

    def is_local(self, hostname: str) -> bool:
        return self.node == hostname

for layer in range(1, 61):
    for expert in range(384):
        placement = plan.get((layer, expert))
        if placement is None:
            continue
        total += placement.bytes_on_disk
print(f"total: {total / 1e9:.1f} GB across {len(nodes)} nodes")
SELECT name, COUNT(*) AS n FROM tokens WHERE length(text) > 3 GROUP BY name ORDER BY n DESC LIMIT 10;
{"role": "user", "content": "Hello!", "tool_calls": [], "temperature": 0.7, "max_tokens": 512}

春天来了，山上的花都开了，红的、黄的、白的，非常漂亮。小朋友们在草地上放风筝，老人们坐在树下聊天。
这家餐厅的饺子特别好吃，每到周末都要排很长的队。服务员说，他们每天要包五千多个饺子。
如果你想学好编程，最重要的是多写代码、多读别人的代码，遇到问题不要怕，慢慢调试就能找到原因。
这个城市的地铁有二十多条线路，每天运送的乘客超过一千万人次。早上八点是最拥挤的时候。
他说：“我明天要去上海开会，下周三回来。”她回答：“好的，路上注意安全，到了给我发消息。”
机器学习模型需要大量的数据来训练。数据的质量往往比数量更重要，干净的数据能让模型学得更好。

Naïve café façade: résumé, coöperate, Zürich, São Paulo, Ελληνικά, Русский текст,日本語のテキスト, 한국어 문장.
"""


def train_bpe(corpus: Iterable[str], split_pattern: str | None = KIMI_K2_PATTERN,
              max_ranks: int = MAX_RANKS) -> tuple[list[str], list[str]]:
    """(token texts by rank, merges "left right") of a byte-level BPE trained on `corpus`, words split
    by `split_pattern` (None: no split, so merges may cross word boundaries). Deterministic."""
    bpe = HFTokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(split_pattern), behavior="isolated")] if split_pattern else []
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        *splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=max_ranks, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError("the trained BPE has gaps in its ids; the tokenizers trainer changed behaviour")
    merges = [" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]  # [left, right]
    return tokens, merges


# Single characters that synthetic tokens are built from, most frequent in English text first: ' ' is
# written "Ġ" in byte-level token texts, so "Ġt", "Ġth", ... begin words.
SYNTHETIC_ALPHABET = (" etaoinshrdlcumwfgypbvkjxqz" "ETAOINSHRDLCUMWFGYPBVKJXQZ" "0123456789"
                      "\n.,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`")


def synthetic_bpe(n_ranks: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE of exactly n_ranks token texts, built without a corpus (a corpus big enough for
    Kimi's 163,584 ranks cannot be trained on in seconds): the 256 bytes, then every two-character
    string over SYNTHETIC_ALPHABET, then three-character ones (a two-character token and one more
    character), and so on. Every token is one merge of two earlier ones, so it tokenizes any text."""
    table = byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    if n_ranks < len(tokens):
        raise ValueError(f"a byte-level BPE has at least 256 ranks, asked for {n_ranks}")
    alphabet = [table[b] for b in SYNTHETIC_ALPHABET.encode()]
    merges: list[str] = []
    level = alphabet
    while len(tokens) < n_ranks:
        longer = [left + right for left in level for right in alphabet][:n_ranks - len(tokens)]
        merges += [f"{token[:-1]} {token[-1]}" for token in longer]
        tokens += longer
        level = longer
    return tokens, merges


def kimi_tokenizer_metadata(ranks: Sequence[str], merges: Sequence[str],
                            chat_template: str = "instruct") -> dict[str, Any]:
    """tokenizer.* GGUF keys for BPE ranks followed by Kimi's 256 special slots (layout above)."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat_template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    n_ranks = len(ranks)
    tokens = list(ranks) + [f"[PAD{n_ranks + i}]" for i in range(NUM_SPECIAL_SLOTS)]
    token_types = [int(TokenType.NORMAL)] * n_ranks + [int(TokenType.UNUSED)] * NUM_SPECIAL_SLOTS
    for text, offset in SPECIAL_OFFSETS.items():
        tokens[n_ranks + offset] = text
        token_types[n_ranks + offset] = int(TokenType.CONTROL)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "kimi-k2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": n_ranks + SPECIAL_OFFSETS["[BOS]"],
        "tokenizer.ggml.eos_token_id": n_ranks + SPECIAL_OFFSETS["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": n_ranks + SPECIAL_OFFSETS["[PAD]"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATES[chat_template],
    }


@lru_cache(maxsize=1)
def _demo_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    tokens, merges = train_bpe(CORPUS.splitlines(keepends=True))
    return tuple(tokens), tuple(merges)


def demo_tokenizer_metadata(chat_template: str = "instruct") -> dict[str, Any]:
    """The tokenizer.* GGUF keys of a demo model; chat_template: "instruct" or "thinking"."""
    return kimi_tokenizer_metadata(*_demo_bpe(), chat_template=chat_template)


def add_tokenizer_to(writer: GGUFWriter, metadata: Mapping[str, Any]) -> None:
    """Write tokenizer.* keys with the GGUF types llama.cpp's converter uses."""
    writers = {
        "tokenizer.ggml.model": writer.add_tokenizer_model,
        "tokenizer.ggml.pre": writer.add_tokenizer_pre,
        "tokenizer.ggml.tokens": writer.add_token_list,
        "tokenizer.ggml.token_type": lambda v: writer.add_token_types([int(t) for t in v]),  # int32 array
        "tokenizer.ggml.merges": writer.add_token_merges,
        "tokenizer.ggml.bos_token_id": lambda v: writer.add_bos_token_id(int(v)),  # uint32
        "tokenizer.ggml.eos_token_id": lambda v: writer.add_eos_token_id(int(v)),
        "tokenizer.ggml.padding_token_id": lambda v: writer.add_pad_token_id(int(v)),
        "tokenizer.ggml.add_bos_token": lambda v: writer.add_add_bos_token(bool(v)),
        "tokenizer.chat_template": writer.add_chat_template,
    }
    unknown = sorted(set(metadata) - set(writers))
    if unknown:
        raise ValueError(f"add_tokenizer_to does not know how to write {', '.join(unknown)}; "
                         "add the key with its GGUF type to demo_vocab.add_tokenizer_to")
    for key, value in metadata.items():
        writers[key](value)
