// olm-validate runs the validators OperatorHub runs on a registry+v1 bundle directory: the default
// bundle validators plus OperatorHubV2, StandardCapabilities, StandardCategories, GoodPractices and
// AlphaDeprecatedAPIs (over the bundle, its CSV and its CRDs, as `operator-sdk bundle validate
// --select-optional suite=operatorframework` does). It prints one line per finding and exits 1 on
// any error (warnings alone exit 0), 2 when the bundle cannot be loaded.
//
// Usage: olm-validate <bundle dir>   (the directory holding manifests/ and metadata/)
//
// tests/go/build.sh caches the binary by the version in its spec table ("v0.45.0-r2": the api
// module version and a revision of this file): bump the revision when you edit this file.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: olm-validate <bundle dir>")
		os.Exit(2)
	}
	// The loader skips directories whose name starts with a dot, "." included.
	dir, err := filepath.Abs(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "olm-validate: %v\n", err)
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "olm-validate: loading %s: %v\n", os.Args[1], err)
		os.Exit(2)
	}
	validators := validation.DefaultBundleValidators.WithValidators(
		validation.OperatorHubV2Validator,
		validation.StandardCapabilitiesValidator,
		validation.StandardCategoriesValidator,
		validation.GoodPracticesValidator,
		validation.AlphaDeprecatedAPIsValidator,
	)
	objs := bundle.ObjectsToValidate()
	var nErrors, nWarnings int
	for _, result := range validators.Validate(objs...) {
		for _, e := range result.Errors {
			nErrors++
			fmt.Printf("ERROR %s: %s\n", result.Name, e.Error())
		}
		for _, w := range result.Warnings {
			nWarnings++
			fmt.Printf("WARNING %s: %s\n", result.Name, w.Error())
		}
	}
	fmt.Printf("bundle %s (package %s, channels %v): %d errors, %d warnings\n",
		bundle.Name, bundle.Package, bundle.Channels, nErrors, nWarnings)
	if nErrors > 0 {
		os.Exit(1)
	}
}
