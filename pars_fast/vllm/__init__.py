"""vLLM V1 integration: ``--scheduler-cls pars_fast.vllm.PARSScheduler``."""
