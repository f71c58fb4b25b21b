//! Job input schema, validation and output shaping (native worker-vllm and OpenAI shapes).
