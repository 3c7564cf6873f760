"""Experiments: each route to EM (steering, ICL, persona prompts, triggers, fine-tuning) as a function
that writes JSON + plotly figures. They compose the science modules; they hold no math of their own."""
