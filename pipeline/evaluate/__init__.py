"""Step 7, evaluate: greedy pass@1 on HumanEval / MBPP with sandboxed execution.

benchmarks.py  loaders, prompts' inputs, and the completion -> program rule
sandbox.py     one isolated, resource-limited process per program (sandbox_child.py runs inside it)
run.py         the Ray Data job (engine actor pool -> execution tasks) and summary.json
"""
