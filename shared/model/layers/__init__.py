"""Building blocks of the text model and the vision tower."""
