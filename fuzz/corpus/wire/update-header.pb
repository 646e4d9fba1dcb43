
;
s-1u-1 
*
layers.0.weight*
layers.0.bias0