"""Reward modelling: the two reward heads, the pairwise loss, scoring responses, held-out RM metrics.

- `models`: a registered reward model or critic, with either head (`load_reward`, `load_critic`);
- `kinds`: what a model reference is (causal LM, reward model with a trained head, dataset) and the check
  every stage runs on each reference in its role before loading it;
- `likelihood`: the likelihood head (a response's log-likelihood under a trained copy of the SFT model);
- `losses`: the Bradley-Terry pairwise loss and accuracy (torch only);
- `scoring`: scores of (prompt, response) through the policy's chat template, shared across ranks;
  the tokenizer check between policy and reward model;
- `evaluation`: pairwise accuracy, margins and per-family accuracy on held-out pairs.

May import: `stages.core` and the torch-only math (`stages.logprobs`); nothing else of ours (checked by
import-linter): the embedded pairs and the stages build on this package, not the other way round.
"""
