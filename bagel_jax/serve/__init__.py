"""`bagel-serve`: a local web page over any checkpoint (understand, generate, edit, think, checkpoint panel).

`backend` is the model side (one loaded model, one lock, input checks, progress hooks) over
`bagel_jax.inference`; `app` is the Gradio page and the command line. Gradio is imported only by `app`."""
