"""Nekoya's Gradio GUI. ``app.ui.build_app`` builds the page, ``app.server.launch_app`` serves it."""
