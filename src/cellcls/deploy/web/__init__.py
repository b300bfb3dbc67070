"""The web app's page (index.html), served by cellcls.serve."""
