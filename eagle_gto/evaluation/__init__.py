"""Speed benchmarks in the EAGLE reference's answer-file format.

`gen_answer` answers a question set (MT-Bench, HumanEval, GSM8K) with
speculative or plain decoding and records new tokens, iterations and wall
time per turn; `speed` compares two answer files (speedup, acceptance
length tau, tokens/s, per category) and draws the plots.
"""
