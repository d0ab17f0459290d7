"""The Kubernetes bridge: custom resources (Shoal's and Fluid's) in, commands out; status facts in, CR status out."""
