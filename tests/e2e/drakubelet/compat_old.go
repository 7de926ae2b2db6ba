//go:build k8spre34

package main

import (
	"context"
	"errors"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// Kubernetes 1.32 and 1.33: dra.ManagerImpl, a RegistrationHandler, no health stream; DRA is
// beta there and off by default, so the gate is turned on as a DRA node would have it.
type oldDRA struct {
	m *dra.ManagerImpl
}

func newManager(ctx context.Context, k *kubelet) (manager, error) {
	if err := utilfeature.DefaultMutableFeatureGate.Set("DynamicResourceAllocation=true"); err != nil {
		return nil, err
	}
	m, err := dra.NewManagerImpl(k.client, k.state, types.NodeName(k.node))
	if err != nil {
		return nil, err
	}
	getNode := func() (*v1.Node, error) { return k.getNode(ctx) }
	if err := m.Start(ctx, k.activePods, getNode, allReady{}); err != nil {
		return nil, err
	}
	return &oldDRA{m}, nil
}

func (d *oldDRA) handler() cache.PluginHandler { return d.m.GetWatcherHandler() }

func (d *oldDRA) registered(driver string) error {
	_, err := draplugin.NewDRAPluginClient(driver)
	return err
}

func (d *oldDRA) PrepareResources(ctx context.Context, pod *v1.Pod) error {
	return d.m.PrepareResources(ctx, pod)
}

func (d *oldDRA) UnprepareResources(ctx context.Context, pod *v1.Pod) error {
	return d.m.UnprepareResources(ctx, pod)
}

func (d *oldDRA) cdiDevices(pod *v1.Pod) ([]string, error) {
	info, err := d.m.GetResources(pod, &pod.Spec.Containers[0])
	if err != nil {
		return nil, err
	}
	var names []string
	for _, c := range info.CDIDevices {
		names = append(names, c.Name)
	}
	return names, nil
}

func (d *oldDRA) health(*v1.Pod) (map[string]string, <-chan struct{}, error) {
	return nil, nil, errors.New("this kubelet has no DRA health stream (1.34+)")
}

func (d *oldDRA) stop() {}

func runPluginManager(ctx context.Context, pm pluginmanager.PluginManager) {
	pm.Run(allReady{}, ctx.Done())
}
