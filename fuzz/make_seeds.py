#!/usr/bin/env python3
"""Writes the seed corpus for the fuzz targets (fuzz/corpus/<target>/). Deterministic; standard library
only. Run from anywhere: `python3 fuzz/make_seeds.py`. The seeds are small on purpose (the whole corpus
stays well under 1 MB): valid inputs that reach deep into each parser, plus a few near-misses.

The micro models here match MICRO_CONFIG in fuzz/entry.rs (a 1-layer llama, hidden 8, vocab 16).
"""
import hashlib
import json
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def js(v):
    return json.dumps(v, separators=(",", ":"))


# ---------------------------------------------------------------- micro llama (shared by GGUF/safetensors)
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 16, 8, 2, 1, 4, 16
# (name in HF checkpoint, name in GGUF, shape as (rows, cols) or (n,))
TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight", (VOCAB, HIDDEN)),
    ("model.norm.weight", "output_norm.weight", (HIDDEN,)),
    ("lm_head.weight", "output.weight", (VOCAB, HIDDEN)),
    ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
    ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)),
    ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", (FFN, HIDDEN)),
    ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", (FFN, HIDDEN)),
    ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", (HIDDEN, FFN)),
    ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", (HIDDEN,)),
    ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight", (HIDDEN,)),
]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def f32_data(shape, seed):
    return b"".join(struct.pack("<f", ((i * 7 + seed) % 13 - 6) / 32.0) for i in range(numel(shape)))


# ---------------------------------------------------------------- safetensors
def safetensors(tensors, metadata=None, dtype="F32", elem=4):
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for i, (name, shape) in enumerate(tensors):
        blob = f32_data(shape, i) if dtype == "F32" else bytes(numel(shape) * elem)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = js(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


micro_st = [(hf, shape) for hf, _, shape in TENSORS]
put("safetensors_header", "micro_llama_valid", safetensors(micro_st, {"format": "pt", "config": "micro"}))
put("safetensors_header", "micro_llama_missing_norm", safetensors(micro_st[:1] + micro_st[2:], {"config": "micro"}))
put("safetensors_header", "micro_llama_wrong_shape",
    safetensors([(n, (s[0] + 1,) + s[1:]) for n, s in micro_st], {"config": "micro"}))
put("safetensors_header", "micro_llama_f16", safetensors(micro_st, {"config": "micro"}, dtype="F16", elem=2))
put("safetensors_header", "empty_header", struct.pack("<Q", 2) + b"{}")
put("safetensors_header", "overlapping_offsets",
    struct.pack("<Q", 88) + js({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode().ljust(88) + bytes(12))
for fam in ["tiny-llama", "tiny-phi3", "tiny-gemma2"]:
    # The real header of a fixture, with the tensor data cut off (declares far more than is there).
    with open(os.path.join(FIXTURES, fam, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = f.read(n)
    hdr = json.loads(head)
    hdr["__metadata__"] = {"config": fam.split("-")[1]}
    h = js(hdr).encode()
    h += b" " * (-len(h) % 8)
    put("safetensors_header", f"{fam}_header_only", struct.pack("<Q", len(h)) + h + bytes(64))


# ---------------------------------------------------------------- GGUF
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)


def g_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def g_val(t, v):
    if t == T_STR:
        return g_str(v)
    if t == T_U32:
        return struct.pack("<I", v)
    if t == T_F32:
        return struct.pack("<f", v)
    if t == T_BOOL:
        return struct.pack("<B", v)
    if t == T_U64:
        return struct.pack("<Q", v)
    if t == T_ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(g_val(et, x) for x in items)
    raise ValueError(t)


def gguf(metadata, tensors, alignment=32):
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, (t, v) in metadata:
        out += g_str(k) + struct.pack("<I", t) + g_val(t, v)
    offset = 0
    blobs = []
    for name, shape, blob in tensors:
        dims = list(reversed(shape))
        out += g_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)  # type 0 = F32
        blobs.append(blob)
        offset += len(blob)
        offset += -offset % alignment
        blobs.append(bytes(-len(blob) % alignment))
    out += bytes(-len(out) % alignment)
    return out + b"".join(blobs)


tokens = [chr(ord("a") + i) for i in range(VOCAB - 4)] + ["ab", "cd", "<s>", "</s>"]
micro_meta = [
    ("general.architecture", (T_STR, "llama")),
    ("general.alignment", (T_U32, 32)),
    ("llama.context_length", (T_U32, 64)),
    ("llama.embedding_length", (T_U32, HIDDEN)),
    ("llama.block_count", (T_U32, 1)),
    ("llama.feed_forward_length", (T_U32, FFN)),
    ("llama.attention.head_count", (T_U32, HEADS)),
    ("llama.attention.head_count_kv", (T_U32, KV_HEADS)),
    ("llama.rope.dimension_count", (T_U32, HEAD_DIM)),
    ("llama.attention.layer_norm_rms_epsilon", (T_F32, 1e-5)),
    ("llama.rope.freq_base", (T_F32, 10000.0)),
    ("tokenizer.ggml.model", (T_STR, "gpt2")),
    ("tokenizer.ggml.pre", (T_STR, "default")),
    ("tokenizer.ggml.tokens", (T_ARR, (T_STR, tokens))),
    ("tokenizer.ggml.merges", (T_ARR, (T_STR, ["a b", "c d"]))),
    ("tokenizer.ggml.bos_token_id", (T_U32, VOCAB - 2)),
    ("tokenizer.ggml.eos_token_id", (T_U32, VOCAB - 1)),
    ("tokenizer.chat_template", (T_STR, "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")),
]
micro_tensors = [(g, shape, f32_data(shape, i)) for i, (_, g, shape) in enumerate(TENSORS)]
put("gguf_header", "micro_llama_valid", gguf(micro_meta, micro_tensors))
put("gguf_header", "micro_llama_no_output_tied", gguf(micro_meta, [t for t in micro_tensors if t[0] != "output.weight"]))
put("gguf_header", "micro_qwen2_missing_bias",
    gguf([(k.replace("llama.", "qwen2."), ((T_STR, "qwen2") if k == "general.architecture" else v)) for k, v in micro_meta],
         micro_tensors))
put("gguf_header", "header_only", gguf(micro_meta, [])[:200])
put("gguf_header", "no_tokenizer", gguf(micro_meta[:11], micro_tensors[:2]))
put("gguf_header", "bad_magic", b"GGUX" + struct.pack("<IQQ", 3, 0, 0))
put("gguf_header", "v2_empty", b"GGUF" + struct.pack("<IQQ", 2, 0, 0))


# ---------------------------------------------------------------- config.json
for fam in sorted(os.listdir(FIXTURES)):
    p = os.path.join(FIXTURES, fam, "config.json")
    if os.path.exists(p):
        put("config_json", f"{fam}", open(p, "rb").read())
    p = os.path.join(FIXTURES, fam, "tokenizer_config.json")
    if os.path.exists(p) and fam == "tiny-qwen2":
        put("config_json", f"{fam}_tokenizer_config", open(p, "rb").read())
put("config_json", "auto_map_remote_code", js({
    "architectures": ["LlamaForCausalLM"], "auto_map": {"AutoModelForCausalLM": "evil.Model"}, "trust_remote_code": True,
    "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 16,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 64}))
put("config_json", "llama3_rope_scaling", js({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "eos_token_id": [1, 2, 3]}))
put("config_json", "unknown_architecture", js({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
put("config_json", "zero_heads", js({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_attention_heads": 0,
                                     "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 4}))


# ---------------------------------------------------------------- job input (job-take bodies)
def job(inp, jid="job-1"):
    return js({"id": jid, "input": inp})


put("job_input", "prompt", job({"prompt": "Hello", "sampling_params": {"max_tokens": 8, "temperature": 0}}))
put("job_input", "messages_stream", job({"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "Hi"}],
                                         "stream": True, "max_batch_size": 4, "min_batch_size": 1,
                                         "batch_size_growth_factor": 2,
                                         "sampling_params": {"n": 2, "seed": 7, "top_p": 0.9, "top_k": 5,
                                                             "min_p": 0.05, "logprobs": 3,
                                                             "stop": ["\n", "END"], "stop_token_ids": [2],
                                                             "repetition_penalty": 1.1, "presence_penalty": 0.5,
                                                             "frequency_penalty": -0.5, "min_tokens": 2,
                                                             "ignore_eos": True, "skip_special_tokens": False,
                                                             "include_stop_str_in_output": True,
                                                             "truncate_prompt_tokens": 100}}))
put("job_input", "content_parts", job({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}]}))
put("job_input", "apply_chat_template", job({"prompt": "hi", "apply_chat_template": True}))
put("job_input", "openai_chat", job({"openai_route": "/v1/chat/completions",
                                     "openai_input": {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 4, "stream": True,
                                                      "stream_options": {"include_usage": True},
                                                      "logprobs": True, "top_logprobs": 2}}))
put("job_input", "openai_completion", job({"openai_route": "/v1/completions",
                                           "openai_input": {"prompt": [[1, 2, 3], "text"], "max_tokens": 3, "n": 2}}))
put("job_input", "openai_models", job({"openai_route": "/v1/models"}))
put("job_input", "batch_of_three", js([{"id": "a", "input": {"prompt": "x"}}, {"id": "b", "input": {}},
                                       {"input": {"prompt": "no id"}}]))
put("job_input", "bad_ranges", job({"prompt": "x", "sampling_params": {"top_p": 0, "n": 1000000, "temperature": -1,
                                                                      "max_tokens": -5, "logprobs": 99,
                                                                      "stop_token_ids": [-1, 4294967296]}}))
put("job_input", "huge_numbers", b'{"id":"j","input":{"prompt":"x","sampling_params":{"n":18446744073709551616,'
                                 b'"seed":-9223372036854775808,"max_tokens":1e308,"temperature":1e-320}}}')
put("job_input", "wrong_types", job({"prompt": ["not", "a", "string"], "sampling_params": "hot", "stream": "yes"}))
put("job_input", "nested_input", job({"prompt": "x", "extra": json.loads("[" * 40 + "1" + "]" * 40)}))
put("job_input", "empty", b"")
put("job_input", "html", b"<html><body>502 Bad Gateway</body></html>")
put("job_input", "truncated", b'{"id":"j","input":{"prompt":"hel')
put("job_input", "unicode", job({"prompt": "\u0000\ud7ff\ue000\U0001F600 \u202e", "sampling_params": {"stop": ["\U0001F600"]}}))


# ---------------------------------------------------------------- OpenAI bodies
put("openai_request", "chat", js({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                  "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": "\n", "seed": 1,
                                  "presence_penalty": 0.1, "frequency_penalty": 0.1, "logprobs": True,
                                  "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True},
                                  "max_completion_tokens": 8, "user": "u"}))
put("openai_request", "chat_tools", js({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
                                        "tools": [{"type": "function", "function": {"name": "f", "parameters":
                                                   {"type": "object", "properties": {"a": {"type": "string"}}}}}],
                                        "chat_template_kwargs": {"enable_thinking": False}}))
put("openai_request", "completion", js({"prompt": "Once", "max_tokens": 5, "echo": True, "logprobs": 2,
                                        "stop": ["x", "y"], "best_of": 1}))
put("openai_request", "completion_ids", js({"prompt": [[1, 2], [3]], "n": 2}))
put("openai_request", "response_format", js({"messages": [{"role": "user", "content": "x"}],
                                             "response_format": {"type": "json_schema", "json_schema": {"pattern": "(a+)+b"}}}))
put("openai_request", "bombs", js({"messages": [{"role": "user", "content": "x"}], "n": 100000, "best_of": 100000,
                                   "logprobs": True, "top_logprobs": 100000, "max_tokens": 2 ** 62,
                                   "logit_bias": {"999999999": 100}}))
put("openai_request", "image_part", js({"messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}))
put("openai_request", "not_object", b"[1,2,3]")


# ---------------------------------------------------------------- chat templates (TEMPLATE \0 MESSAGES)
conv = js([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}])
for i in range(5):
    put("chat_template", f"fixture_{i}", f"{i}\0{conv}")
put("chat_template", "loop_nested", "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}")
put("chat_template", "range_huge", "{% for i in range(999999999) %}{{ i }}{% endfor %}")
put("chat_template", "string_mul", "{{ 'a' * 100000000 }}{{ ('b' * 1000000) * 1000 }}")
put("chat_template", "recursive_macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
put("chat_template", "include", "{% include '/etc/passwd' %}{% import 'x' as y %}")
put("chat_template", "raise", "{{ raise_exception('no system role') }}")
put("chat_template", "methods", "{{ messages[0].content.upper().split('s') | tojson(indent=4) }}{{ strftime_now('%Y') }}"
                               "{{ messages | map(attribute='role') | join(',') }}\0" + conv)
put("chat_template", "deep_nesting", "{{" + "(" * 200 + "1" + ")" * 200 + "}}")
put("chat_template", "namespace_loop", "{% set ns = namespace(x=[]) %}{% for m in messages %}"
                                       "{% set ns.x = ns.x + ns.x + [m] %}{% endfor %}{{ ns.x | length }}\0" + conv)
# Growth bombs (finding F1 and its relatives, docs/ROBUSTNESS.md): values that grow faster than the
# instructions that build them, or that share structure and are then walked. The CI replays more of
# them with expectations (tests/robustness_corpus.rs, `growth_bombs`); these seed the mutator.
def doubled(body, tail, n=64, start="[1]"):
    return ("{% set s = namespace(v=" + start + ", w=" + start + ") %}{% for i in range(" + str(n) + ") %}"
            "{% set s.v = " + body + " %}{% set s.w = " + body.replace("s.v", "s.w") + " %}{% endfor %}" + tail)


put("chat_template", "grow_list_doubling", doubled("s.v + s.v", "{{ s.v | length }}") + "\0" + conv)
put("chat_template", "grow_shared_printed", doubled("[s.v, s.v]", "{{ s.v }}{{ s.v ~ '' }}{{ s.v | string }}"))
put("chat_template", "grow_shared_compared", doubled("[s.v, s.v]", "{{ s.v == s.w }}{{ [s.w, s.v] | sort }}"))
put("chat_template", "grow_shared_serialized", doubled("[s.v, s.v]", "{{ s.v | tojson(indent=2) }}{{ s.v | pprint }}"))
put("chat_template", "grow_shared_map", doubled("{'a': s.v, 'b': s.v}", "{{ s.v | tojson }}{{ s.v | dictsort }}",
                                                 start="{'a': 1}"))
put("chat_template", "grow_shared_joined", doubled("[s.v, s.v]", "{{ s.v | join(',') }}{{ ''.join(s.v) }}"
                                                   "{{ (s.v | string).upper() }}"))
put("chat_template", "grow_deep_chain", doubled("[s.v]", "{{ s.v | length }}{{ s.v }}{{ s.v | tojson }}{{ s.v == s.w }}",
                                                n=100000))
put("chat_template", "grow_lazy_chains", doubled("s.v[:] * 1", "{{ s.v | chain('ab') | list }}{{ s.v }}", n=100000))
put("chat_template", "grow_sum_chain", doubled("[s.v, s.w] | sum(start=[])", "{{ (s.v | chain(s.w)) | length }}"))
put("chat_template", "grow_repeated_strings", "{{ ([('x' * 100000)] * 100000) | join }}{{ ''.join([('y' * 1000)] * 100000) }}"
                                              "{{ '{:>1000000000}'.format('a') }}{{ '%-1000000000s' | format('b') }}")
put("chat_template", "grow_captured", "{% macro m() %}{{ caller() }}{% endmacro %}"
                                      + doubled("[s.v, s.v]", "{% call m() %}{{ s.v }}{% endcall %}{% set x %}{{ s.w }}{% endset %}{{ x }}"))
put("chat_template", "grow_strings", "{% set s = namespace(v='aa') %}{% for i in range(64) %}{% set s.v = s.v | replace('a', 'aa') %}"
                                     "{% endfor %}{% for i in range(100000) %}{{ loop.cycle('a' * 1000, 'b') }}{% endfor %}")

print("seeds written under", os.path.join(ROOT, "corpus"))
