"""Reward modelling: the two reward heads, the pairwise loss, scoring responses, held-out RM metrics.

- `models`: a registered reward model or critic, with either head (`load_reward`, `load_critic`);
- `functions`: reward functions (built-in verifiers such as `exact_answer` and `instruction_constraints`, or the
  user's own code), weighted, with the prompt rows' columns, for PPO, GRPO, RLOO and the sampling stage;
- `checkers`: the one adapter to the instruction-following checker packages (IFEval's, IFBench's), offline;
- `kinds`: what a model reference is (causal LM, reward model with a trained head, dataset) and the check
  every stage runs on each reference in its role before loading it;
- `likelihood`: the likelihood head (a response's log-likelihood under a trained copy of the SFT model);
- `losses`: the Bradley-Terry pairwise loss and accuracy (torch only);
- `scoring`: scores of (prompt, response) through the policy's chat template, shared across ranks;
  the tokenizer check between policy and reward model;
- `evaluation`: pairwise accuracy, margins and per-family accuracy on held-out pairs.

May import: `stages.core`, the torch-only math (`stages.logprobs`), `stages.tasks.constraints` (stdlib only: what a
finished answer looks like) and external checker packages; nothing else of ours (checked by import-linter): the
embedded pairs and the stages build on this package, not the other way round.
"""
