"""Catalog tooling: the shipped rule catalog measured against LOLRMM (attribution, report), its
generator (`make catalog`) and its lint. Not imported by the agent's scan path."""
