"""Objectives: one module per algorithm (pure loss math + its batches); no loop code here."""
