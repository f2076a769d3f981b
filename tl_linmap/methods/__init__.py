"""Methods built on the linear maps: layer decompositions and token attributions, sequence and
generation attributions, attribution patching, steering, corpus analyses, expert contributions."""
