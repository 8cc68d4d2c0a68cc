//go:build !linux

package main

import (
	"context"
	"errors"
	"io"
)

func run(context.Context, options, io.Writer, func(*Results) error) (*Results, error) {
	return nil, errors.New("the live benchmark needs Linux (network namespaces, netfilter)")
}
