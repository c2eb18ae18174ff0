"""Run with /work/main/.venv/bin/python: dump the captured feeds (first 64 calls per graph) to pickles
so that the ModelOpt venv (which does not have cheers_deploy) can read them."""
import pickle, sys
from cheers_deploy.calibration.common import iter_feeds, GRAPHS
W = '/tmp/modelopt_eval/w'
for g in GRAPHS:
    feeds = list(iter_feeds(W, g, limit=64))
    with open(f'/tmp/modelopt_eval/feeds/{g}.pkl', 'wb') as f:
        pickle.dump(feeds, f)
    print(g, len(feeds))
