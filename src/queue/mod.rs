//! The RunPod worker protocol: job-take, job-done, job-stream, ping, job-stop.
