"""The Label Studio integration, used by the HTTP app (backend.app) and the fine-tuning jobs
(backend.jobs, backend.finetune): image fetching with Label Studio's auth (fetch), URL checks
(urls), the RLE/polygon mask codecs (masks), label-config parsing (labelconfig), the API pull of a
project's tasks and annotations (pull), and a synthetic export for tests and trials (make_export).
"""
