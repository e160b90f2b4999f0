

def __getattr__(name: str):
    """`from moelab import LLM, SamplingParams` without importing torch for the spec-only modules."""
    if name == "LLM":
        from moelab.llm import LLM

        return LLM
    if name == "SamplingParams":
        from moelab.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
