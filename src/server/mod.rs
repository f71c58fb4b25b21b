//! The local dev API server: RunPod routes and OpenAI routes.
