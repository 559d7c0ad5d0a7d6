"""Web demo (issue 9): upload chest X-rays, reconstruct a CT with a trained bundle, browse it in the browser.

    python -m webapp --checkpoint bundles/perx2ct/models/model.pt [--bundle perx2ct] [--host 127.0.0.1 --port 8000]

Modules: ``uploads`` (validate uploaded radiographs), ``models`` (load bundle checkpoints behind one
interface), ``jobs`` (a single worker thread that runs reconstructions in order), ``render`` (slice, X-ray and
DRR PNGs), ``app`` (the FastAPI routes), ``__main__`` (the ``fire`` CLI). The page is ``static/index.html``.
"""
