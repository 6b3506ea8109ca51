"""tmps: calibrated Tucker / MPS compression of transformer attention."""
