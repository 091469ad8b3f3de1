"""A Streamlit dashboard over the experiment log (`python main_train.py dashboard`).

- `data`: reads the log read-only into plain rows (no Streamlit, no Altair);
- `charts`: the Altair charts of those rows, with one colour per ranker on every page;
- `app`: the Streamlit script (pages Runs, Run and Compare);
- `browser`: serves the dashboard and drives a headless system Chromium (tests, screenshots).

Nothing here imports TensorFlow or Keras.
"""

import os

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
