"""Assignments: which of the U units each of the K experts keeps, at a kept-MACs budget."""
